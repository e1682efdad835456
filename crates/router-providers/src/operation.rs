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
}

impl Operation {
    /// Every operation, in a fixed order (the index of [`Operation::index`]).
    pub const ALL: [Operation; 4] = [Operation::Native, Operation::Chat, Operation::Completions, Operation::Embeddings];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Native => "native",
            Operation::Chat => "chat",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
        }
    }

    /// The position in [`Operation::ALL`], for per-operation tables.
    pub fn index(self) -> usize {
        self as usize
    }
}
