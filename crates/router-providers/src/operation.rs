//! What a client asked for, whatever door it came through.

/// One kind of inference call. A door parses its shape into one of these; a
/// provider says which it serves and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `POST /v1/inference`, the router's own shape.
    Native,
    /// OpenAI chat completions.
    Chat,
    /// OpenAI (legacy) completions.
    Completions,
    /// OpenAI embeddings.
    Embeddings,
    /// The OpenAI Responses API.
    Responses,
    /// The Anthropic Messages API.
    Messages,
    /// Anthropic's token counting for a Messages request.
    CountTokens,
}

impl Operation {
    /// Every operation, in a fixed order (the index of [`Operation::index`]).
    pub const ALL: [Operation; 7] = [
        Operation::Native,
        Operation::Chat,
        Operation::Completions,
        Operation::Embeddings,
        Operation::Responses,
        Operation::Messages,
        Operation::CountTokens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Native => "native",
            Operation::Chat => "chat",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
            Operation::Messages => "messages",
            Operation::CountTokens => "count_tokens",
        }
    }

    /// The position in [`Operation::ALL`], for per-operation tables.
    pub fn index(self) -> usize {
        self as usize
    }
}
