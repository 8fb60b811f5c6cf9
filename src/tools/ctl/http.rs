//! The HTTP side of `petrel ctl`: one blocking agent (ureq, rustls on ring) bounded by
//! [`TIMEOUT`], URLs built segment by segment (a client id or topic is always one
//! percent-encoded segment), credentials kept in the `Authorization` header only, paging, and
//! every failure sorted into the exit code a script sees.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use url::Url;

use super::{ApiArgs, PageArgs};

/// The bound on each request: connecting, sending and reading the answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Rows asked for per request when every page is fetched (the API allows up to 10 000).
const PAGE_SIZE: u32 = 1000;
/// Pages fetched at most for one listing, so a broker that always says `hasnext` cannot keep
/// us looping.
const MAX_PAGES: u32 = 1000;

/// A credential: parsed like a string, shown as `***`.
#[derive(Clone)]
pub(super) struct Secret(pub(super) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum CtlError {
    /// The API answered with an error status.
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
    /// What came back is not what the API sends.
    #[error("unexpected answer from {url}: {detail}")]
    BadAnswer { url: String, detail: String },
    /// Nothing usable answered.
    #[error("cannot reach the API at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{0}")]
    Usage(String),
}

impl CtlError {
    pub(super) fn exit_code(&self) -> u8 {
        match self {
            Self::Refused { .. } | Self::BadAnswer { .. } => 1,
            Self::Usage(_) => 2,
            Self::Unreachable { .. } => 3,
        }
    }
}

pub(super) type CtlResult<T> = Result<T, CtlError>;

/// The API as seen from here: a base URL, an HTTP agent and what goes in `Authorization`.
pub(super) struct Api {
    agent: ureq::Agent,
    /// Without user information (that moves into `authorization`), so it can be printed.
    base: Url,
    authorization: Option<String>,
    /// `--json`: print the API's JSON instead of text.
    pub(super) json: bool,
}

impl Api {
    pub(super) fn new(args: &ApiArgs) -> CtlResult<Self> {
        let mut base = Url::parse(&args.url)
            .map_err(|err| CtlError::Usage(format!("--url: not a URL ({err})")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(CtlError::Usage(
                "--url must be an http:// or https:// URL".into(),
            ));
        }
        // `http://user:password@host` works, but the URL is printed in errors: keep the
        // credentials out of it.
        let in_url = (!base.username().is_empty()).then(|| {
            let user = percent_decoded(base.username());
            let password = base.password().map(percent_decoded).unwrap_or_default();
            format!("{user}:{password}")
        });
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let credentials = match (&args.api_key, &args.user, &args.password) {
            (Some(Secret(key)), _, _) => {
                if !key.contains(':') {
                    return Err(CtlError::Usage(
                        "--api-key (PETREL_API_KEY) must be KEY:SECRET".into(),
                    ));
                }
                Some(key.clone())
            }
            (None, user, Some(Secret(password))) => {
                Some(format!("{}:{password}", user.as_deref().unwrap_or("admin")))
            }
            (None, Some(_), None) => {
                return Err(CtlError::Usage(
                    "--user needs --password (or PETREL_API_PASSWORD)".into(),
                ))
            }
            (None, None, None) => in_url,
        };
        let mut agent = ureq::AgentBuilder::new().timeout(TIMEOUT).redirects(0);
        if let Some(ca) = &args.cafile {
            agent = agent.tls_config(tls_config(ca)?);
        }
        Ok(Self {
            agent: agent.build(),
            base,
            authorization: credentials.map(|c| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(c)
                )
            }),
            json: args.json,
        })
    }

    /// The URL of `segments` under the base (each one percent-encoded, `/` included) with
    /// `query`.
    pub(super) fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in Api::new: the base URL can have a path")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        url
    }

    /// Sends a request; `Ok` only for a 2xx answer, whose body is returned.
    pub(super) fn call(&self, method: &str, url: &Url, body: Option<Value>) -> CtlResult<String> {
        let mut request = self.agent.request_url(method, url);
        if let Some(authorization) = &self.authorization {
            request = request.set("Authorization", authorization);
        }
        let answer = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let printable = url.as_str().to_owned();
        let response = match answer {
            Ok(response) => response,
            Err(ureq::Error::Status(status, response)) => {
                return Err(self.refusal(status, response));
            }
            Err(ureq::Error::Transport(err)) => {
                let detail = transport_detail(&err);
                return Err(match err.kind() {
                    ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                        CtlError::Usage(format!("--url {printable}: {detail}"))
                    }
                    _ => CtlError::Unreachable {
                        url: printable,
                        detail,
                    },
                });
            }
        };
        let status = response.status();
        if !(200..300).contains(&status) {
            // A redirect (not followed: it would carry our credentials elsewhere).
            return Err(self.refusal(status, response));
        }
        response.into_string().map_err(|err| CtlError::Unreachable {
            url: printable,
            detail: format!("reading the answer: {err}"),
        })
    }

    /// EMQX's error JSON (`{"code", "message"}`) of an error answer, or its status line.
    fn refusal(&self, status: u16, response: ureq::Response) -> CtlError {
        let reason = response.status_text().to_owned();
        let body: Option<Value> = response
            .into_string()
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
        let field = |key: &str| {
            body.as_ref()
                .and_then(|b| b[key].as_str())
                .map(str::to_owned)
        };
        let code = field("code").unwrap_or_else(|| format!("HTTP {status}"));
        let mut message = field("message").unwrap_or(reason);
        if status == 401 && self.authorization.is_none() {
            message.push_str(" (give --api-key, or --user and --password)");
        }
        CtlError::Refused { code, message }
    }

    pub(super) fn get(&self, segments: &[&str], query: &[(&str, String)]) -> CtlResult<Value> {
        let url = self.url(segments, query);
        parse_json(&url, &self.call("GET", &url, None)?)
    }

    /// The rows of a paged listing: the page `--page` names, or every page (at most
    /// [`MAX_PAGES`]). Also the JSON to print: the page as the API sent it, or every row in
    /// one envelope.
    pub(super) fn list(
        &self,
        segments: &[&str],
        mut query: Vec<(&str, String)>,
        paging: &PageArgs,
    ) -> CtlResult<(Vec<Value>, Value)> {
        if let Some(page) = paging.page {
            query.push(("page", page.to_string()));
            if let Some(limit) = paging.limit {
                query.push(("limit", limit.to_string()));
            }
            let body = self.get(segments, &query)?;
            return Ok((rows(&body), body));
        }
        query.push(("limit", paging.limit.unwrap_or(PAGE_SIZE).to_string()));
        let mut all = Vec::new();
        for page in 1..=MAX_PAGES {
            let mut query = query.clone();
            query.push(("page", page.to_string()));
            let body = self.get(segments, &query)?;
            all.extend(rows(&body));
            if body["meta"]["hasnext"] != Value::Bool(true) {
                let envelope = json!({
                    "data": all,
                    "meta": {"count": all.len(), "hasnext": false},
                });
                return Ok((all, envelope));
            }
        }
        eprintln!("warning: stopped after {MAX_PAGES} pages; use --page for the rest");
        let envelope = json!({"data": all, "meta": {"count": all.len(), "hasnext": true}});
        Ok((all, envelope))
    }
}

fn rows(body: &Value) -> Vec<Value> {
    body["data"].as_array().cloned().unwrap_or_default()
}

pub(super) fn parse_json(url: &Url, text: &str) -> CtlResult<Value> {
    serde_json::from_str(text).map_err(|err| CtlError::BadAnswer {
        url: url.to_string(),
        detail: format!("not JSON ({err})"),
    })
}

/// ureq's account of a failed exchange, without the URL (we print our own). Its parts often
/// repeat one another ("Network Error: Network Error: ..."): each says only what is new.
fn transport_detail(err: &ureq::Transport) -> String {
    let parts = [
        Some(err.kind().to_string()),
        err.message().map(str::to_owned),
        std::error::Error::source(err).map(ToString::to_string),
    ];
    let mut detail = String::new();
    for part in parts.into_iter().flatten() {
        if detail.is_empty() || part.starts_with(&detail) {
            detail = part;
        } else if !detail.contains(&part) {
            detail.push_str(": ");
            detail.push_str(&part);
        }
    }
    detail
}

fn percent_decoded(text: &str) -> String {
    // Form decoding reads `+` as a space; in user information it is a plus.
    let text = text.replace('+', "%2B");
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// A rustls client configuration trusting only the CAs in `path` (Petrel's ring provider).
fn tls_config(path: &Path) -> CtlResult<Arc<rustls::ClientConfig>> {
    let usage = |detail: String| CtlError::Usage(format!("--cafile {}: {detail}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in petrel::transport::certs::load_certs(path).map_err(|e| usage(e.to_string()))? {
        roots.add(cert).map_err(|e| usage(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(petrel::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| usage(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tools::ctl::path;

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let secret: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{secret:?}"), "***");
    }

    #[test]
    fn ids_and_topics_are_one_percent_encoded_path_segment() {
        let args = ApiArgs {
            url: "http://u:p%40ss@127.0.0.1:18083/prefix/".into(),
            api_key: None,
            user: None,
            password: None,
            cafile: None,
            json: false,
        };
        let api = Api::new(&args).unwrap();
        let url = api.url(
            &path(&["mqtt", "retainer", "message", "a/b c/#?"]),
            &[("like_clientid", "x&y".into())],
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:18083/prefix/api/v5/mqtt/retainer/message/a%2Fb%20c%2F%23%3F?like_clientid=x%26y"
        );
        let expected = base64::engine::general_purpose::STANDARD.encode("u:p@ss");
        assert_eq!(api.authorization, Some(format!("Basic {expected}")));
    }
}
