//! The mock backend without sockets: a [`Transport`] that hands each request
//! to the mock's routes in process. With it the pipeline runs whole inside
//! one test, on paused time when timing matters (a socket would let paused
//! time run ahead of the I/O it waits for).

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use router_providers::transport::{AttemptError, ResponseBody, ResponseFuture, Transport};
use tower::ServiceExt;

/// Routes each request by its authority (`host:port`) to one in-process mock.
pub struct InProcess {
    mocks: Vec<(String, Arc<mock_backend::Mock>)>,
}

impl InProcess {
    /// `mocks`: (authority, mock), e.g. `("b1:80", mock)` for `http://b1:80`.
    pub fn new(mocks: Vec<(&str, Arc<mock_backend::Mock>)>) -> Self {
        Self { mocks: mocks.into_iter().map(|(a, m)| (a.to_string(), m)).collect() }
    }
}

impl Transport for InProcess {
    fn send(&self, request: Request<Full<Bytes>>) -> ResponseFuture {
        let authority = request.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        let mock = self.mocks.iter().find(|(a, _)| *a == authority).map(|(_, m)| m.clone());
        Box::pin(async move {
            let Some(mock) = mock else {
                return Err(AttemptError::Connect(format!("no mock at {authority}: Connection refused")));
            };
            let response = mock_backend::app(mock).oneshot(request.map(axum::body::Body::new)).await;
            let response = match response {
                Ok(r) => r,
                Err(e) => match e {},
            };
            Ok(response.map(|b| ResponseBody::Boxed(b.map_err(|e| e.into()).boxed_unsync())))
        })
    }
}
