//! A small blocking client of the node API, for the CLI.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use super::ErrorBody;

/// Default API address of the local node.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:9410";
/// Time limit of one API call.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// the node answered with an error
    #[error("{message}")]
    Refused { status: u16, message: String },
    /// the node could not be reached
    #[error("cannot reach the ballast node at {url}: {reason}\nhint: start it with `ballast node run --data-dir DIR`, or point --api / BALLAST_API at a running node")]
    Unreachable { url: String, reason: String },
    /// the answer was not what the API promises
    #[error("unexpected answer from {url}: {reason}")]
    BadAnswer { url: String, reason: String },
}

/// The API of one node.
pub struct ApiClient {
    base: String,
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer` (`auth::cli_token` by default).
    token: Option<String>,
}

impl ApiClient {
    #[must_use]
    pub fn new(base: &str) -> Self {
        Self::with_timeout(base, CALL_TIMEOUT)
    }

    /// A client whose calls may take up to `timeout` (long operations).
    #[must_use]
    pub fn with_timeout(base: &str, timeout: std::time::Duration) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            agent: ureq::AgentBuilder::new().timeout(timeout).build(),
            token: super::auth::cli_token(base),
        }
    }

    /// Uses `token` instead of the CLI's.
    #[must_use]
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn finish<T: DeserializeOwned>(
        &self,
        url: &str,
        result: Result<ureq::Response, ureq::Error>,
    ) -> Result<T, ClientError> {
        match result {
            Ok(response) => {
                let text = response.into_string().map_err(|error| ClientError::BadAnswer {
                    url: url.to_owned(),
                    reason: error.to_string(),
                })?;
                let text = if text.is_empty() { "null" } else { text.as_str() };
                serde_json::from_str(text).map_err(|error| ClientError::BadAnswer {
                    url: url.to_owned(),
                    reason: error.to_string(),
                })
            }
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<ErrorBody>(&text).map_or(text, |body| body.error);
                Err(ClientError::Refused { status, message })
            }
            Err(ureq::Error::Transport(transport)) => Err(ClientError::Unreachable {
                url: url.to_owned(),
                reason: transport.to_string(),
            }),
        }
    }

    /// GET `path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        self.finish(&url, self.request("GET", &url).call())
    }

    /// POST `body` to `path`.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let url = self.url(path);
        self.finish(&url, self.request("POST", &url).send_json(body))
    }

    /// POST `body` to `path` (no answer body expected).
    pub fn post_no_content<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        let url = self.url(path);
        self.finish::<serde_json::Value>(&url, self.request("POST", &url).send_json(body))
            .map(|_| ())
    }

    /// PATCH `path` with `body`.
    pub fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let url = self.url(path);
        self.finish(&url, self.request("PATCH", &url).send_json(body))
    }

    /// PUT `body` to `path`, reading the answer.
    pub fn put_json<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let url = self.url(path);
        self.finish(&url, self.request("PUT", &url).send_json(body))
    }

    /// PUT `body` to `path` (no answer body expected).
    pub fn put<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        let url = self.url(path);
        self.finish::<serde_json::Value>(&url, self.request("PUT", &url).send_json(body))
            .map(|_| ())
    }

    /// DELETE `path`, reading the answer.
    pub fn delete_for<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        self.finish(&url, self.request("DELETE", &url).call())
    }

    /// DELETE `path`.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        let url = self.url(path);
        self.finish::<serde_json::Value>(&url, self.request("DELETE", &url).call())
            .map(|_| ())
    }
}
