//! A small HTTP/1.1 client of the admin endpoint, for `ctl` and `top`: where the endpoint is,
//! which token to present and where that token came from (so a 401 can say which one was
//! wrong), and one request per connection over hyper's client.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use weighbridge::Config;

use super::config_path;
use super::failure::Failure;

/// The environment variable a token is taken from when `--token` is not given.
pub(crate) const TOKEN_ENV: &str = "WEIGHBRIDGE_TOKEN";

/// How long a connect to the endpoint may take: it is local or near, and an operator waiting
/// on a dead address wants to hear so soon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a whole exchange may take once connected (a reload answers when it is done).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer read: `/metrics` of a large fleet is a few MiB.
const MAX_BODY: usize = 64 << 20;

/// Where the admin endpoint is and how to authenticate: the options `ctl` and `top` share.
#[derive(Debug, Clone, Args)]
pub(crate) struct AdminArgs {
    /// The admin endpoint: IP:PORT, HOST:PORT or http://HOST:PORT[/PREFIX]. Default: `[admin]
    /// bind` of the configuration file (--config, else $WEIGHBRIDGE_CONFIG, else
    /// /etc/weighbridge/weighbridge.toml).
    #[arg(long, value_name = "ADDR|URL", global = true)]
    pub(crate) admin: Option<String>,
    /// Bearer token. Default: $WEIGHBRIDGE_TOKEN, else `[admin] token` of that file when the
    /// endpoint is the one it configures.
    #[arg(long, value_name = "TOKEN", global = true)]
    pub(crate) token: Option<String>,
    /// Configuration file to take the defaults from.
    #[arg(short, long, value_name = "FILE", global = true)]
    pub(crate) config: Option<PathBuf>,
}

/// Where the token presented came from, named in the error of a 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenSource {
    Flag,
    Env,
    Config(PathBuf),
    None,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Flag => f.write_str("the token from --token"),
            TokenSource::Env => write!(f, "the token from ${TOKEN_ENV}"),
            TokenSource::Config(path) => {
                write!(f, "the token from [admin] token in {}", path.display())
            }
            TokenSource::None => write!(
                f,
                "no token (none given by --token, ${TOKEN_ENV} or the configuration file)"
            ),
        }
    }
}

/// The endpoint's address as given, split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// `host:port`, to connect to and to send as `Host`.
    authority: String,
    /// A path prefix before the routes (`/lb` for `http://proxy:80/lb`), without a trailing
    /// slash; empty for the endpoint itself.
    prefix: String,
    /// Where the address came from, for messages: `--admin` or `[admin] bind in FILE`.
    origin: String,
}

impl Target {
    /// Reads `--admin`: `IP:PORT`, `HOST:PORT` or `http://HOST[:PORT][/PREFIX]`.
    pub(crate) fn parse(value: &str, origin: &str) -> Result<Target, Failure> {
        let value = value.trim();
        if value.starts_with("https://") {
            return Err(Failure::Other(format!(
                "--admin {value}: the admin endpoint speaks plain HTTP; use http:// (or a local \
                 proxy that terminates TLS)"
            )));
        }
        let (rest, default_port) = match value.strip_prefix("http://") {
            Some(rest) => (rest, Some(80)),
            None => (value, None),
        };
        let (authority, prefix) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let has_port = match authority.rfind(']') {
            Some(end) => authority[end..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = match (has_port, default_port) {
            (true, _) => authority.to_owned(),
            (false, Some(port)) => format!("{authority}:{port}"),
            (false, None) => {
                return Err(Failure::Other(format!(
                    "--admin {value}: no port; give IP:PORT, HOST:PORT or an http:// URL"
                )));
            }
        };
        if authority.starts_with(':') || authority.is_empty() {
            return Err(Failure::Other(format!("--admin {value}: no host")));
        }
        // An endpoint bound to every address (0.0.0.0, [::]) is reached on loopback here.
        let authority = match authority.parse::<SocketAddr>() {
            Ok(addr) => reachable(addr).to_string(),
            Err(_) => authority,
        };
        Ok(Target {
            authority,
            prefix: prefix.to_owned(),
            origin: origin.to_owned(),
        })
    }

    /// The address for a configured bind.
    pub(crate) fn of_bind(bind: SocketAddr, config: &Path) -> Target {
        Target {
            authority: reachable(bind).to_string(),
            prefix: String::new(),
            origin: format!("[admin] bind in {}", config.display()),
        }
    }

    /// `host:port`, as shown to the operator.
    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    /// The address with where it came from, for error messages.
    pub(crate) fn describe(&self) -> String {
        format!("{}{} (from {})", self.authority, self.prefix, self.origin)
    }
}

/// The address a client uses to reach a socket bound to `addr`.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// An answer: its status and body.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
}

impl Answer {
    /// The `error` field of a JSON error answer, else the body as it is.
    pub(crate) fn error_text(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| self.body.trim().to_owned())
    }
}

/// A client of one admin endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    target: Target,
    token: Option<String>,
    source: TokenSource,
}

impl Client {
    /// The client the options describe: the address from `--admin`, else from the file's
    /// `[admin] bind`; the token from `--token`, else `$WEIGHBRIDGE_TOKEN`, else the file's
    /// `[admin] token` when the endpoint is the file's own. `parent_config` is a `--config`
    /// given before the subcommand.
    pub(crate) fn from_args(
        args: &AdminArgs,
        parent_config: Option<&Path>,
    ) -> Result<Client, Failure> {
        let env_token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        let (token, source) = match (&args.token, env_token) {
            (Some(token), _) => (Some(token.clone()), TokenSource::Flag),
            (None, Some(token)) => (Some(token), TokenSource::Env),
            (None, None) => (None, TokenSource::None),
        };
        let flag = args.config.as_deref().or(parent_config);
        let mut client = match &args.admin {
            Some(admin) => Client {
                target: Target::parse(admin, "--admin")?,
                token,
                source,
            },
            None => {
                let path = config_path::locate_from_env(flag)
                    .map_err(|e| Failure::Other(format!("{e}, or give --admin ADDR")))?;
                let (config, _) = Config::read(&path).map_err(|e| {
                    Failure::Other(format!("{e} (give --admin ADDR to skip the file)"))
                })?;
                let bind = config.admin_bind().ok_or_else(|| {
                    Failure::Other(format!(
                        "{} has no [admin] table, so no admin endpoint: add one, or give --admin ADDR",
                        path.display()
                    ))
                })?;
                let client = Client {
                    target: Target::of_bind(bind, &path),
                    token,
                    source,
                };
                return Ok(client.with_config_token(&config, bind, &path));
            }
        };
        // An address given by hand gets the file's token only when it is the file's endpoint:
        // the token is not sent to another host because a file happened to be found.
        if client.token.is_none() {
            if let Ok(path) = config_path::locate_from_env(flag) {
                if let Ok((config, _)) = Config::read(&path) {
                    if let Some(bind) = config.admin_bind() {
                        client = client.with_config_token(&config, bind, &path);
                    }
                }
            }
        }
        Ok(client)
    }

    /// Takes the file's token when none was given and the target is the file's `bind`.
    fn with_config_token(mut self, config: &Config, bind: SocketAddr, path: &Path) -> Client {
        if self.token.is_none() && self.target.authority == reachable(bind).to_string() {
            if let Some(token) = config.admin_token() {
                self.token = Some(token.to_owned());
                self.source = TokenSource::Config(path.to_path_buf());
            }
        }
        self
    }

    /// The endpoint's address, as shown.
    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// `GET path`.
    pub(crate) async fn get(&self, path: &str) -> Result<Answer, Failure> {
        self.request(Method::GET, path).await
    }

    /// `POST path`, without a body.
    pub(crate) async fn post(&self, path: &str) -> Result<Answer, Failure> {
        self.request(Method::POST, path).await
    }

    /// One request on a fresh connection. A 401 becomes [`Failure::Unauthorized`] naming the
    /// token's source; every other status is the caller's to judge.
    async fn request(&self, method: Method, path: &str) -> Result<Answer, Failure> {
        let unreachable = |why: String| {
            Failure::Unreachable(format!(
                "cannot reach the admin endpoint at {}: {why}",
                self.target.describe()
            ))
        };
        let stream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect(self.target.authority.as_str()),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {}",
                    humantime::format_duration(CONNECT_TIMEOUT)
                )));
            }
        };
        let exchange = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let mut request = Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", self.target.prefix))
                .header(HOST, self.target.authority.as_str());
            if let Some(token) = &self.token {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| ExchangeError::Other(e.to_string()))?;
            // The connection is driven beside the request; it ends when both are done.
            let (response, driven) = tokio::join!(
                async {
                    let response = sender.send_request(request).await?;
                    let status = response.status().as_u16();
                    let body = Limited::new(response.into_body(), MAX_BODY)
                        .collect()
                        .await
                        .map_err(|e| ExchangeError::Other(e.to_string()))?
                        .to_bytes();
                    drop(sender);
                    Ok::<_, ExchangeError>((status, body))
                },
                connection
            );
            let (status, body) = response?;
            // An error closing a connection whose answer was read whole changes nothing.
            drop(driven);
            Ok::<_, ExchangeError>((status, body))
        };
        let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return Err(unreachable(format!("{method} {path}: {e}")));
            }
            Err(_) => {
                return Err(unreachable(format!(
                    "{method} {path}: no answer within {}",
                    humantime::format_duration(REQUEST_TIMEOUT)
                )));
            }
        };
        let answer = Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        if answer.status == 401 {
            return Err(Failure::Unauthorized(format!(
                "the admin endpoint at {} refused {} ({})",
                self.target.authority(),
                self.source,
                answer.error_text()
            )));
        }
        Ok(answer)
    }

    /// `GET path`, expecting 200.
    pub(crate) async fn get_ok(&self, path: &str) -> Result<String, Failure> {
        let answer = self.get(path).await?;
        if answer.status == 200 {
            Ok(answer.body)
        } else {
            Err(Failure::Other(format!(
                "GET {path} at {}: {} {}",
                self.target.authority(),
                answer.status,
                answer.error_text()
            )))
        }
    }
}

/// Why an exchange on an open connection failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Result<(String, String), Failure> {
        Target::parse(value, "--admin").map(|t| (t.authority, t.prefix))
    }

    #[test]
    fn addresses_and_urls_name_an_authority_and_a_prefix() {
        let ok = |a: &str, p: &str| Ok((a.to_owned(), p.to_owned()));
        assert_eq!(parse("127.0.0.1:9900"), ok("127.0.0.1:9900", ""));
        assert_eq!(parse("[::1]:9900"), ok("[::1]:9900", ""));
        assert_eq!(parse("lb-1.example:9900"), ok("lb-1.example:9900", ""));
        assert_eq!(parse("http://127.0.0.1:9900/"), ok("127.0.0.1:9900", ""));
        assert_eq!(
            parse("http://proxy.example/lb/"),
            ok("proxy.example:80", "/lb")
        );
        assert_eq!(parse("http://[::1]/x"), ok("[::1]:80", "/x"));
        assert_eq!(parse("0.0.0.0:9900"), ok("127.0.0.1:9900", ""));
        assert_eq!(parse("[::]:9900"), ok("[::1]:9900", ""));
    }

    #[test]
    fn an_address_without_a_port_or_with_tls_is_refused() {
        for bad in [
            "127.0.0.1",
            "lb-1.example",
            "https://lb:9900",
            ":9900",
            "[::1]",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
