//! The shared job token: every RPC carries it, every server checks it.
//!
//! A job's processes share one secret [`Token`]. Clients send it as `authorization: Bearer
//! <token>` on every call ([`ClientAuth`]); servers refuse a call without it, or with another
//! one, with `UNAUTHENTICATED` before the call reaches the service ([`ServerAuth`]), so a
//! refused call changes nothing. The comparison takes the same time wherever the tokens differ.
//!
//! The token reaches a process through [`ENV_TOKEN`] (set by the launcher, or on Kubernetes
//! from a Secret) or a file ([`Token::from_file`]).

use std::path::Path;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable that holds the job's token.
pub const ENV_TOKEN: &str = "GRADFLOW_TOKEN";

const HEADER: &str = "authorization";
const SCHEME: &str = "Bearer ";

/// Why a text is not a token. It never holds the text: that may be a secret with a typo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a token must be 16 to 1024 visible ASCII characters (no spaces), found {len} characters")]
    Malformed { len: usize },
}

/// Why the token a process was given cannot be used: where it came from, and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum TokenSourceError {
    #[error("{ENV_TOKEN}: {0}")]
    Env(TokenError),
    #[error("token file {}: {source}", path.display())]
    Unreadable { path: std::path::PathBuf, source: std::io::Error },
    #[error("token file {}: {source}", path.display())]
    Malformed { path: std::path::PathBuf, source: TokenError },
}

/// A job's shared secret. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text: 16 to 1024 visible ASCII characters (surrounding whitespace
    /// ignored).
    pub fn new(text: impl Into<String>) -> Result<Token, TokenError> {
        let text = text.into().trim().to_string();
        if text.len() < 16 || text.len() > 1024 || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Malformed { len: text.len() });
        }
        Ok(Token(text))
    }

    /// A fresh random token: 32 bytes from the operating system, as hex.
    pub fn generate() -> Token {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the operating system's random source works");
        Token(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The token in [`ENV_TOKEN`], if it is set.
    pub fn from_env() -> Result<Option<Token>, TokenSourceError> {
        match std::env::var(ENV_TOKEN) {
            Ok(text) => Token::new(text).map(Some).map_err(TokenSourceError::Env),
            Err(_) => Ok(None),
        }
    }

    /// The token in a file (surrounding whitespace ignored), as a mounted Secret provides it.
    pub fn from_file(path: &Path) -> Result<Token, TokenSourceError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenSourceError::Unreadable { path: path.into(), source })?;
        Token::new(text).map_err(|source| TokenSourceError::Malformed { path: path.into(), source })
    }

    /// The token's text, to hand to a child process or a Secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Adds the token to every call of a client.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientAuth {
    pub fn new(token: Option<&Token>) -> ClientAuth {
        let header = token.map(|t| {
            format!("{SCHEME}{}", t.0).parse().expect("a token is visible ASCII, a valid header value")
        });
        ClientAuth { header }
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert(HEADER, h.clone());
        }
        Ok(request)
    }
}

/// Refuses every call that does not carry the server's token (when it has one).
#[derive(Clone, Debug, Default)]
pub struct ServerAuth {
    token: Option<Token>,
}

impl ServerAuth {
    pub fn new(token: Option<Token>) -> ServerAuth {
        ServerAuth { token }
    }
}

impl ServerAuth {
    /// Checks the token a client sent (`None`: it sent none), for calls that do not come
    /// through gRPC (the tensor link).
    pub fn check(&self, sent: Option<&[u8]>) -> Result<(), Status> {
        let Some(token) = &self.token else { return Ok(()) };
        let Some(sent) = sent else {
            return Err(Status::unauthenticated(format!(
                "no job token: this server needs `{HEADER}: {SCHEME}<token>` on every call (set {ENV_TOKEN} for the client)"
            )));
        };
        if bool::from(sent.ct_eq(token.0.as_bytes())) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong job token: this server belongs to another job"))
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let sent = request.metadata().get(HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        self.check(sent.strip_prefix(SCHEME.as_bytes())).map(|_| request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(server: &mut ServerAuth, client: Option<&Token>) -> Result<(), Status> {
        let request = ClientAuth::new(client).call(Request::new(())).unwrap();
        server.call(request).map(|_| ())
    }

    #[test]
    fn only_the_right_token_passes() {
        let token = Token::generate();
        let mut server = ServerAuth::new(Some(token.clone()));
        assert!(call(&mut server, Some(&token)).is_ok());
        let err = call(&mut server, None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("no job token"), "{}", err.message());
        let other = Token::generate();
        let err = call(&mut server, Some(&other)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("wrong job token"), "{}", err.message());
        // A prefix of the token is not the token.
        let prefix = Token::new(&token.expose()[..20]).unwrap();
        assert!(call(&mut server, Some(&prefix)).is_err());
        // Without a token the server takes every call.
        assert!(call(&mut ServerAuth::new(None), None).is_ok());
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("has a space in the middle").is_err());
        let t = Token::new("  0123456789abcdef0123\n").unwrap();
        assert_eq!(t.expose(), "0123456789abcdef0123");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        let (a, b) = (Token::generate(), Token::generate());
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
    }
}
