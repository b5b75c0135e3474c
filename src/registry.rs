//! Does an image have a SOCI index? (`doctor --image REF`)
//!
//! The SOCI snapshotter loads an image lazily only when it finds a SOCI
//! index for the image's platform manifest; otherwise it pulls in full. It
//! looks in the registry exactly as this module does:
//!
//! - **SOCI v1** indexes (`artifactType`
//!   `application/vnd.amazon.soci.index.v1+json`) are separate manifests whose
//!   `subject` is the image manifest. They are found through the OCI
//!   referrers API `GET /v2/<repo>/referrers/<digest>`, or, on a registry
//!   without that API (it answers 404, like distribution 2.8), through the
//!   referrers tag schema: an image index tagged `sha256-<hex>` listing the
//!   referrers, which is what oras-go based pushers (`soci push`) write there.
//!   Like the snapshotter (oras-go), the tag is only consulted when the API
//!   is missing.
//! - **SOCI v2** indexes (`...soci.index.v2+json`, SOCI >= 0.10) have no
//!   subject: the image manifest itself carries the annotation
//!   `com.amazon.soci.index-digest`, and the image index lists the SOCI
//!   index beside it.
//!
//! For an image index the manifest for this node's platform (linux/<arch>) is
//! the one that counts; the index digest is checked too, and an index found
//! only there is reported but does not make the pull lazy (the snapshotter
//! never looks there).
//!
//! Credentials are the node's docker config, which SOCI consults too:
//! `credHelpers.<host>` (a `docker-credential-<helper> get` run, bounded),
//! `auths.<host>` (`auth` or `username`/`password`), then `credsStore`.
//! Registries that answer 401 with a `Bearer` challenge get the token flow
//! (realm, service, scope); `Basic` challenges get the credentials directly.
//! Every request shares one deadline.

use crate::run;
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const SOCI_INDEX_V1: &str = "application/vnd.amazon.soci.index.v1+json";
pub const SOCI_INDEX_V2: &str = "application/vnd.amazon.soci.index.v2+json";
/// On an image manifest: the digest of its SOCI v2 index.
pub const ANNOTATION_INDEX_DIGEST: &str = "com.amazon.soci.index-digest";

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";
const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";
/// Manifests and referrer lists are small; anything bigger is not one.
const MAX_BODY: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub connect_timeout: Duration,
    /// Bound on the whole check (every request shares it).
    pub timeout: Duration,
    /// http:// instead of https:// (loopback test registries).
    pub plain_http: bool,
    /// The docker config to read credentials from (a real path); None or a
    /// missing file: anonymous.
    pub docker_config: Option<PathBuf>,
    /// Where `docker-credential-<helper>` binaries are looked up; empty:
    /// `$PATH`.
    pub helper_dirs: Vec<PathBuf>,
    /// Bound on one credential helper run.
    pub helper_timeout: Duration,
    /// The platform whose manifest counts in an image index.
    pub os: String,
    pub arch: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            plain_http: false,
            docker_config: None,
            helper_dirs: Vec::new(),
            helper_timeout: Duration::from_secs(5),
            os: "linux".into(),
            arch: crate::facts::go_arch(std::env::consts::ARCH).to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The OCI referrers API.
    Referrers,
    /// The referrers tag schema (`sha256-<hex>`).
    Tag,
    /// SOCI v2: `com.amazon.soci.index-digest` on the image manifest.
    Annotation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FoundIndex {
    pub digest: String,
    pub artifact_type: String,
    pub via: Via,
    /// The manifest (or image index) it belongs to.
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexReport {
    /// The reference as understood (`docker.io/library/nginx:latest`).
    pub reference: String,
    /// The image manifest for the node's platform: what SOCI looks up.
    pub digest: String,
    /// The image index, when the reference names one.
    pub index_digest: Option<String>,
    /// `linux/amd64`.
    pub platform: String,
    pub indexes: Vec<FoundIndex>,
    /// Whether the registry has the referrers API; None when not asked.
    pub referrers_api: Option<bool>,
    /// A SOCI index SOCI would use exists: the pull will be lazy.
    pub lazy: bool,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference:?} is not an image reference: {message}")]
    BadReference { reference: String, message: String },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: the registry wants credentials ({detail}); add them to the docker config (auths or a credHelpers entry such as ecr-login)")]
    Unauthorized { url: String, detail: String },
    #[error("{reference}: no such image in the registry ({url} answered 404)")]
    NotFound { reference: String, url: String },
    #[error("{url}: {message}")]
    BadResponse { url: String, message: String },
    #[error("{reference}: the image index has no {platform} manifest (it has: {available})")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    #[error("credentials for {registry}: {message}")]
    Credentials { registry: String, message: String },
    #[error("no answer within {ms} ms in total; check the network path to the registry")]
    Deadline { ms: u64 },
}

// ---------------------------------------------------------------------------
// References

/// `host[:port]/repo[:tag][@digest]`, normalized like docker does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// As written (or `docker.io`): the key for credentials.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let bad = |message: &str| RegistryError::BadReference {
            reference: s.to_string(),
            message: message.to_string(),
        };
        let s = s.trim();
        if s.is_empty() || s.contains(char::is_whitespace) || s.contains("://") {
            return Err(bad("expected host[:port]/repository[:tag][@digest]"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("a sha256 digest has 64 hex digits"));
                }
                (r, Some(d.to_ascii_lowercase()))
            }
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, p))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), p.to_string())
            }
            _ => (DOCKER_HUB.to_string(), rest.to_string()),
        };
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p.to_string(), Some(t.to_string())),
            _ => (path, None),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let ok_component = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if !repository.split('/').all(ok_component) {
            return Err(bad(
                "repository names are lowercase letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad("a tag is up to 128 letters, digits, '.', '_' and '-'"));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host the API is served from.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the manifests endpoint for: the digest when given.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Credentials

#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub secret: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <secret>)", self.username)
    }
}

/// The credential for `registry` from a docker config, per docker's
/// order: `credHelpers.<host>`, `auths.<host>`, `credsStore`.
pub fn credential_for(
    registry: &str,
    opts: &RegistryOptions,
) -> Result<Option<Credential>, RegistryError> {
    let Some(path) = &opts.docker_config else {
        return Ok(None);
    };
    let cred_err = |message: String| RegistryError::Credentials {
        registry: registry.to_string(),
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cred_err(format!("{}: {e}", path.display()))),
    };
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| cred_err(format!("{} is not JSON: {e}", path.display())))?;
    let aliases: Vec<&str> = if registry == DOCKER_HUB {
        vec![DOCKER_HUB, "index.docker.io", DOCKER_HUB_API]
    } else {
        vec![registry]
    };
    // Keys may be `https://host/v1/`, `http://host` or `host`.
    let find = |table: &serde_json::Value| -> Option<serde_json::Value> {
        table.as_object()?.iter().find_map(|(k, v)| {
            let host = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("");
            aliases.contains(&host).then(|| v.clone())
        })
    };
    let helper_server = if registry == DOCKER_HUB {
        DOCKER_HUB_AUTH_KEY
    } else {
        registry
    };
    if let Some(helper) = find(&cfg["credHelpers"]).and_then(|v| v.as_str().map(String::from)) {
        return run_helper(&helper, helper_server, opts).map_err(cred_err);
    }
    if let Some(entry) = find(&cfg["auths"]) {
        if let Some(auth) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| cred_err(format!("auths.{registry}.auth is not base64: {e}")))?;
            let raw = String::from_utf8(raw)
                .map_err(|_| cred_err(format!("auths.{registry}.auth is not UTF-8")))?;
            let (u, p) = raw.split_once(':').ok_or_else(|| {
                cred_err(format!(
                    "auths.{registry}.auth is not base64(user:password)"
                ))
            })?;
            return Ok(Some(Credential {
                username: u.to_string(),
                secret: p.to_string(),
            }));
        }
        if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
            return Ok(Some(Credential {
                username: u.to_string(),
                secret: p.to_string(),
            }));
        }
    }
    if let Some(store) = cfg["credsStore"].as_str().filter(|s| !s.is_empty()) {
        return run_helper(store, helper_server, opts).map_err(cred_err);
    }
    Ok(None)
}

/// `docker-credential-<helper> get` with the server on stdin. run.rs gives
/// its children no stdin, so a shell here-document feeds it; `exec` makes
/// the helper the process run.rs bounds (and kills on timeout).
fn run_helper(
    helper: &str,
    server: &str,
    opts: &RegistryOptions,
) -> Result<Option<Credential>, String> {
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("helper name {helper:?} is not a plain name"));
    }
    let name = format!("docker-credential-{helper}");
    let dirs: Vec<PathBuf> = if opts.helper_dirs.is_empty() {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default()
    } else {
        opts.helper_dirs.clone()
    };
    let bin = dirs
        .iter()
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{name} is not installed (looked in {}); SOCI cannot use it either",
                show_dirs(&dirs)
            )
        })?;
    let script = "exec \"$0\" get <<SOCI_NODE_EOF\n$1\nSOCI_NODE_EOF\n";
    let bin_s = bin.display().to_string();
    let out = match run::run(
        Path::new("/bin/sh"),
        &["-c", script, &bin_s, server],
        opts.helper_timeout,
    ) {
        Ok(o) => o,
        // The helper's way of saying "nothing stored": anonymous.
        Err(run::RunError::Failed { stderr, .. })
            if stderr
                .to_ascii_lowercase()
                .contains("credentials not found") =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.to_string()),
    };
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .map_err(|e| format!("{name} get printed something that is not JSON: {e}"))?;
    match (v["Username"].as_str(), v["Secret"].as_str()) {
        (Some(u), Some(s)) => Ok(Some(Credential {
            username: u.to_string(),
            secret: s.to_string(),
        })),
        _ => Err(format!("{name} get printed no Username/Secret")),
    }
}

fn show_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------
// HTTP with registry auth

/// A `WWW-Authenticate` challenge: scheme and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// `Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"`.
/// Quoted values may hold commas; unquoted ones end at a comma.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = match h.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (h, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.trim().is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

struct Reply {
    url: String,
    status: u16,
    content_type: Option<String>,
    digest_header: Option<String>,
    body: Vec<u8>,
}

enum Auth {
    None,
    Basic,
    Bearer(String),
}

struct Session<'a> {
    http: reqwest::blocking::Client,
    base: String,
    image: &'a ImageRef,
    opts: &'a RegistryOptions,
    started: Instant,
    /// Looked up on the first 401 only: anonymous registries never run a
    /// credential helper.
    cred: Option<Option<Credential>>,
    auth: Auth,
}

impl<'a> Session<'a> {
    fn new(image: &'a ImageRef, opts: &'a RegistryOptions) -> Result<Session<'a>, RegistryError> {
        let host = image.api_host();
        let scheme = if opts.plain_http { "http" } else { "https" };
        let base = format!("{scheme}://{host}");
        let mut b = reqwest::blocking::Client::builder()
            .connect_timeout(opts.connect_timeout.min(opts.timeout))
            .timeout(opts.timeout)
            .user_agent(concat!("soci-node/", env!("CARGO_PKG_VERSION")));
        let hostname = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
        if matches!(hostname, "localhost" | "127.0.0.1" | "[::1]") {
            b = b.no_proxy();
        }
        let http = b.build().map_err(|e| RegistryError::Transport {
            url: base.clone(),
            message: format!("cannot build an HTTP client: {e}"),
        })?;
        Ok(Session {
            http,
            base,
            image,
            opts,
            started: Instant::now(),
            cred: None,
            auth: Auth::None,
        })
    }

    fn remaining(&self) -> Result<Duration, RegistryError> {
        self.opts
            .timeout
            .checked_sub(self.started.elapsed())
            .filter(|d| *d >= Duration::from_millis(10))
            .ok_or(RegistryError::Deadline {
                ms: self.opts.timeout.as_millis() as u64,
            })
    }

    fn credential(&mut self) -> Result<Option<Credential>, RegistryError> {
        if self.cred.is_none() {
            self.cred = Some(credential_for(&self.image.registry, self.opts)?);
        }
        Ok(self.cred.clone().flatten())
    }

    fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        accept: &str,
        auth: &Auth,
        cred: Option<&Credential>,
    ) -> Result<(reqwest::blocking::Response, String), RegistryError> {
        let mut req = self
            .http
            .request(method, url)
            .timeout(self.remaining()?)
            .header(reqwest::header::ACCEPT, accept);
        match (auth, cred) {
            (Auth::Bearer(t), _) => req = req.bearer_auth(t),
            (Auth::Basic, Some(c)) => req = req.basic_auth(&c.username, Some(&c.secret)),
            _ => {}
        }
        let resp = req.send().map_err(|e| RegistryError::Transport {
            url: url.to_string(),
            message: describe(&e),
        })?;
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok((resp, challenge))
    }

    /// GET (or HEAD) with auth: on a 401, answer the challenge once.
    fn request(
        &mut self,
        method: reqwest::Method,
        path: &str,
        accept: &str,
    ) -> Result<Reply, RegistryError> {
        let url = format!("{}{path}", self.base);
        let cred = self.cred.clone().flatten();
        let (mut resp, challenge) =
            self.send(method.clone(), &url, accept, &self.auth, cred.as_ref())?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            let ch = parse_challenge(&challenge).ok_or_else(|| RegistryError::Unauthorized {
                url: url.clone(),
                detail: "401 without a WWW-Authenticate challenge".into(),
            })?;
            let cred = self.credential()?;
            self.auth = match ch.scheme.as_str() {
                "bearer" => Auth::Bearer(self.token(&ch, cred.as_ref(), &url)?),
                "basic" if cred.is_some() => Auth::Basic,
                "basic" => {
                    return Err(RegistryError::Unauthorized {
                        url,
                        detail: "Basic challenge and no credentials for this registry".into(),
                    })
                }
                other => {
                    return Err(RegistryError::Unauthorized {
                        url,
                        detail: format!("unsupported auth scheme {other:?}"),
                    })
                }
            };
            resp = self
                .send(method, &url, accept, &self.auth, cred.as_ref())?
                .0;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED
                || resp.status() == reqwest::StatusCode::FORBIDDEN
            {
                return Err(RegistryError::Unauthorized {
                    url,
                    detail: format!(
                        "HTTP {} with {}",
                        resp.status().as_u16(),
                        if cred.is_some() {
                            "the configured credentials"
                        } else {
                            "anonymous access"
                        }
                    ),
                });
            }
        }
        read_reply(url, resp)
    }

    /// The Bearer token flow: GET realm?service=..&scope=.., with the
    /// credentials as Basic auth when there are any.
    fn token(
        &self,
        ch: &Challenge,
        cred: Option<&Credential>,
        for_url: &str,
    ) -> Result<String, RegistryError> {
        let realm = ch
            .params
            .get("realm")
            .filter(|r| !r.is_empty())
            .ok_or_else(|| RegistryError::Unauthorized {
                url: for_url.to_string(),
                detail: "Bearer challenge without a realm".into(),
            })?;
        let default_scope = format!("repository:{}:pull", self.image.repository);
        let scope = ch.params.get("scope").cloned().unwrap_or(default_scope);
        let mut url = reqwest::Url::parse(realm).map_err(|e| RegistryError::BadResponse {
            url: for_url.to_string(),
            message: format!("token realm {realm:?} is not a URL: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = ch.params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", &scope);
        }
        let mut req = self.http.get(url.clone()).timeout(self.remaining()?);
        if let Some(c) = cred {
            req = req.basic_auth(&c.username, Some(&c.secret));
        }
        let url_s = url.to_string();
        let resp = req.send().map_err(|e| RegistryError::Transport {
            url: url_s.clone(),
            message: describe(&e),
        })?;
        let reply = read_reply(url_s.clone(), resp)?;
        if reply.status == 401 || reply.status == 403 {
            return Err(RegistryError::Unauthorized {
                url: url_s,
                detail: format!(
                    "the token service refused {} (HTTP {})",
                    if cred.is_some() {
                        "the configured credentials"
                    } else {
                        "anonymous access"
                    },
                    reply.status
                ),
            });
        }
        if reply.status != 200 {
            return Err(status_error(&reply));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&reply.body).map_err(|e| RegistryError::BadResponse {
                url: url_s.clone(),
                message: format!("token response is not JSON: {e}"),
            })?;
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .filter(|t| !t.is_empty())
            .map(String::from)
            .ok_or_else(|| RegistryError::BadResponse {
                url: url_s,
                message: "token response has no token".into(),
            })
    }
}

fn read_reply(url: String, resp: reqwest::blocking::Response) -> Result<Reply, RegistryError> {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
    };
    let content_type = header("content-type");
    let digest_header = header("docker-content-digest");
    let mut body = Vec::new();
    resp.take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| RegistryError::Transport {
            url: url.clone(),
            message: format!("reading the response: {e}"),
        })?;
    if body.len() as u64 > MAX_BODY {
        return Err(RegistryError::BadResponse {
            url,
            message: format!("response larger than {MAX_BODY} bytes"),
        });
    }
    Ok(Reply {
        url,
        status,
        content_type,
        digest_header,
        body,
    })
}

fn status_error(r: &Reply) -> RegistryError {
    let body: String = String::from_utf8_lossy(&r.body)
        .chars()
        .take(200)
        .collect::<String>()
        .trim()
        .to_string();
    RegistryError::Status {
        url: r.url.clone(),
        status: r.status,
        body,
    }
}

fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    // The innermost cause says why (refused, DNS, TLS).
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(c) = src {
        last = Some(c.to_string());
        src = c.source();
    }
    if let Some(l) = last {
        s.push_str(": ");
        s.push_str(&l);
    }
    s
}

// ---------------------------------------------------------------------------
// The lookup

struct Manifest {
    digest: String,
    doc: serde_json::Value,
}

impl Manifest {
    fn is_index(&self) -> bool {
        let mt = self.doc["mediaType"].as_str().unwrap_or("");
        mt == OCI_INDEX || mt == DOCKER_LIST || self.doc["manifests"].is_array()
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in h {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn get_manifest(s: &mut Session, reference: &str) -> Result<Manifest, RegistryError> {
    let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
    let path = format!("/v2/{}/manifests/{reference}", s.image.repository);
    let r = s.request(reqwest::Method::GET, &path, &accept)?;
    if r.status == 404 {
        return Err(RegistryError::NotFound {
            reference: s.image.to_string(),
            url: r.url,
        });
    }
    if r.status != 200 {
        return Err(status_error(&r));
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| RegistryError::BadResponse {
            url: r.url.clone(),
            message: format!("manifest is not JSON: {e}"),
        })?;
    // The digest of the bytes is what referrers point at; a registry's
    // header says the same for sha256 (a mismatch would be a broken proxy).
    let computed = sha256_digest(&r.body);
    if let Some(h) = &r.digest_header {
        if h.starts_with("sha256:") && *h != computed {
            return Err(RegistryError::BadResponse {
                url: r.url,
                message: format!("Docker-Content-Digest {h} does not match the body ({computed})"),
            });
        }
    }
    if reference.starts_with("sha256:") && reference != computed {
        return Err(RegistryError::BadResponse {
            url: r.url,
            message: format!("asked for {reference}, got content with digest {computed}"),
        });
    }
    let _ = r.content_type;
    Ok(Manifest {
        digest: computed,
        doc,
    })
}

fn is_soci_type(t: &str) -> bool {
    t == SOCI_INDEX_V1 || t == SOCI_INDEX_V2
}

/// SOCI indexes listed in an image index of referrers (API answer or
/// fallback tag).
fn soci_referrers(list: &serde_json::Value, subject: &str, via: Via) -> Vec<FoundIndex> {
    list["manifests"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| {
                    let t = d["artifactType"].as_str()?;
                    let digest = d["digest"].as_str()?;
                    is_soci_type(t).then(|| FoundIndex {
                        digest: digest.to_string(),
                        artifact_type: t.to_string(),
                        via,
                        subject: subject.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// v1 indexes of `subject`: the referrers API, or the fallback tag when the
/// registry has no API. `api` remembers what the registry said.
fn referrers_of(
    s: &mut Session,
    subject: &str,
    api: &mut Option<bool>,
) -> Result<Vec<FoundIndex>, RegistryError> {
    if *api != Some(false) {
        let path = format!(
            "/v2/{}/referrers/{subject}?artifactType={}",
            s.image.repository,
            SOCI_INDEX_V1.replace('+', "%2B").replace('/', "%2F")
        );
        let r = s.request(reqwest::Method::GET, &path, OCI_INDEX)?;
        match r.status {
            200 => {
                let list: serde_json::Value =
                    serde_json::from_slice(&r.body).map_err(|e| RegistryError::BadResponse {
                        url: r.url.clone(),
                        message: format!("referrers answer is not JSON: {e}"),
                    })?;
                *api = Some(true);
                return Ok(soci_referrers(&list, subject, Via::Referrers));
            }
            // No referrers API: distribution 2.8 answers 404; some answer
            // 400/405/501 for an unknown endpoint.
            404 | 400 | 405 | 501 => *api = Some(false),
            _ => return Err(status_error(&r)),
        }
    }
    let tag = subject.replacen(':', "-", 1);
    let path = format!("/v2/{}/manifests/{tag}", s.image.repository);
    let r = s.request(reqwest::Method::GET, &path, OCI_INDEX)?;
    match r.status {
        200 => {
            let list: serde_json::Value =
                serde_json::from_slice(&r.body).map_err(|e| RegistryError::BadResponse {
                    url: r.url.clone(),
                    message: format!("referrers tag {tag} is not JSON: {e}"),
                })?;
            Ok(soci_referrers(&list, subject, Via::Tag))
        }
        404 => Ok(vec![]),
        _ => Err(status_error(&r)),
    }
}

/// Does the SOCI v2 index an annotation names exist?
fn manifest_exists(s: &mut Session, digest: &str) -> Result<bool, RegistryError> {
    let path = format!("/v2/{}/manifests/{digest}", s.image.repository);
    let r = s.request(reqwest::Method::HEAD, &path, OCI_MANIFEST)?;
    match r.status {
        200 => Ok(true),
        404 => Ok(false),
        _ => Err(status_error(&r)),
    }
}

/// Is there a SOCI index for `image_ref` that SOCI would use?
pub fn soci_index(image_ref: &str, opts: &RegistryOptions) -> Result<IndexReport, RegistryError> {
    let image = ImageRef::parse(image_ref)?;
    let mut s = Session::new(&image, opts)?;
    let platform = format!("{}/{}", opts.os, opts.arch);
    let top = get_manifest(&mut s, image.reference())?;

    let mut indexes = Vec::new();
    let mut index_digest = None;
    let mut v2_annotation: Option<String> = None;
    let manifest = if top.is_index() {
        let descs = top.doc["manifests"].as_array().cloned().unwrap_or_default();
        // Image manifests only: SOCI indexes and attestations listed in the
        // same index have an artifactType or an "unknown" platform.
        let images: Vec<&serde_json::Value> = descs
            .iter()
            .filter(|d| d["artifactType"].is_null())
            .filter(|d| d["platform"]["os"].as_str() != Some("unknown"))
            .collect();
        let chosen = images.iter().find(|d| {
            d["platform"]["os"].as_str() == Some(opts.os.as_str())
                && d["platform"]["architecture"].as_str() == Some(opts.arch.as_str())
        });
        let Some(chosen) = chosen else {
            let available: Vec<String> = images
                .iter()
                .map(|d| {
                    format!(
                        "{}/{}",
                        d["platform"]["os"].as_str().unwrap_or("?"),
                        d["platform"]["architecture"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            return Err(RegistryError::NoPlatform {
                reference: image.to_string(),
                platform,
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            });
        };
        v2_annotation = chosen["annotations"][ANNOTATION_INDEX_DIGEST]
            .as_str()
            .map(String::from);
        let digest = chosen["digest"].as_str().unwrap_or("").to_string();
        index_digest = Some(top.digest.clone());
        get_manifest(&mut s, &digest)?
    } else {
        top
    };
    if let Some(a) = manifest.doc["annotations"][ANNOTATION_INDEX_DIGEST].as_str() {
        v2_annotation = Some(a.to_string());
    }

    let mut notes = Vec::new();
    if let Some(d) = v2_annotation {
        if manifest_exists(&mut s, &d)? {
            indexes.push(FoundIndex {
                digest: d,
                artifact_type: SOCI_INDEX_V2.into(),
                via: Via::Annotation,
                subject: manifest.digest.clone(),
            });
        } else {
            notes.push(format!(
                "the manifest names SOCI v2 index {d}, which the registry does not have"
            ));
        }
    }
    let mut api = None;
    indexes.extend(referrers_of(&mut s, &manifest.digest, &mut api)?);
    if let Some(idx) = &index_digest {
        indexes.extend(referrers_of(&mut s, idx, &mut api)?);
    }

    let usable: Vec<&FoundIndex> = indexes
        .iter()
        .filter(|i| i.subject == manifest.digest)
        .collect();
    let lazy = !usable.is_empty();
    let where_ = match api {
        Some(true) => "referrers API".to_string(),
        Some(false) => "no referrers API; tag fallback".to_string(),
        None => "not asked".to_string(),
    };
    let message = if lazy {
        let how: Vec<String> = usable
            .iter()
            .map(|i| {
                let v = if i.artifact_type == SOCI_INDEX_V2 {
                    "v2"
                } else {
                    "v1"
                };
                let via = match i.via {
                    Via::Referrers => "referrers API".to_string(),
                    Via::Tag => format!("tag {}", manifest.digest.replacen(':', "-", 1)),
                    Via::Annotation => "manifest annotation".to_string(),
                };
                format!("{v} {} via {via}", short(&i.digest))
            })
            .collect();
        format!("SOCI index found ({}): pull will be lazy", how.join(", "))
    } else if !indexes.is_empty() {
        format!(
            "no SOCI index for the {platform} manifest {} (one is attached to the image index {}, where SOCI does not look): full pull",
            short(&manifest.digest),
            short(index_digest.as_deref().unwrap_or(""))
        )
    } else {
        format!(
            "no SOCI index for {platform} manifest {} ({where_}): full pull",
            short(&manifest.digest)
        )
    };
    let message = if notes.is_empty() {
        message
    } else {
        format!("{message}; {}", notes.join("; "))
    };
    Ok(IndexReport {
        reference: image.to_string(),
        digest: manifest.digest,
        index_digest,
        platform,
        indexes,
        referrers_api: api,
        lazy,
        message,
    })
}

fn short(d: &str) -> String {
    d.chars().take(7 + 12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    // -- a fake registry on 127.0.0.1 -------------------------------------

    #[derive(Debug, Clone)]
    struct Req {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
    }

    impl Req {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    fn resp(status: u16, content_type: &str, body: &[u8]) -> Resp {
        Resp {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.to_vec(),
        }
    }

    fn not_found() -> Resp {
        resp(404, "text/plain", b"404 page not found\n")
    }

    type Handler = dyn Fn(&Req) -> Resp + Send + Sync;

    struct Fake {
        addr: String,
        log: Arc<Mutex<Vec<Req>>>,
        stop: Arc<AtomicBool>,
        handle: Option<std::thread::JoinHandle<()>>,
    }

    impl Fake {
        fn start(handler: Arc<Handler>) -> Fake {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            l.set_nonblocking(true).unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (log2, stop2) = (log.clone(), stop.clone());
            let handle = std::thread::spawn(move || {
                let started = Instant::now();
                while !stop2.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60)
                {
                    match l.accept() {
                        Ok((s, _)) => {
                            let (h, log) = (handler.clone(), log2.clone());
                            std::thread::spawn(move || serve(s, &*h, &log));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
            Fake {
                addr,
                log,
                stop,
                handle: Some(handle),
            }
        }

        fn requests(&self) -> Vec<Req> {
            self.log.lock().unwrap().clone()
        }

        fn paths(&self) -> Vec<String> {
            self.requests()
                .into_iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    fn serve(mut s: TcpStream, h: &Handler, log: &Mutex<Vec<Req>>) {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let mut lines = text.split("\r\n");
        let mut first = lines.next().unwrap_or("").split_whitespace();
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let headers = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let req = Req {
            method,
            path,
            headers,
        };
        log.lock().unwrap().push(req.clone());
        let r = h(&req);
        let mut out = format!("HTTP/1.1 {} X\r\n", r.status);
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            r.body.len()
        ));
        let _ = s.write_all(out.as_bytes());
        if req.method != "HEAD" {
            let _ = s.write_all(&r.body);
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
    }

    // -- registry content -------------------------------------------------

    /// Manifests by tag or digest, the referrers API (None: 404) and
    /// the fallback tags, for repository `app`.
    #[derive(Default, Clone)]
    struct Content {
        manifests: BTreeMap<String, (String, Vec<u8>)>,
        referrers: Option<BTreeMap<String, Vec<serde_json::Value>>>,
    }

    impl Content {
        fn put(&mut self, tag: Option<&str>, media_type: &str, doc: &serde_json::Value) -> String {
            let bytes = serde_json::to_vec(doc).unwrap();
            let d = sha256_digest(&bytes);
            self.manifests
                .insert(d.clone(), (media_type.into(), bytes.clone()));
            if let Some(t) = tag {
                self.manifests.insert(t.into(), (media_type.into(), bytes));
            }
            d
        }

        fn image(&mut self, tag: Option<&str>, annotations: serde_json::Value) -> String {
            self.put(
                tag,
                OCI_MANIFEST,
                &serde_json::json!({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", "c".repeat(64)), "size": 2},
                    "layers": [], "annotations": annotations,
                }),
            )
        }

        /// A SOCI v1 index manifest with `subject`; returns its descriptor.
        fn soci_v1(&mut self, subject: &str) -> serde_json::Value {
            let d = self.put(
                None,
                OCI_MANIFEST,
                &serde_json::json!({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": SOCI_INDEX_V1, "digest": format!("sha256:{}", "4".repeat(64)), "size": 2},
                    "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
                }),
            );
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": 1, "artifactType": SOCI_INDEX_V1})
        }

        fn referrers_index(descs: &[serde_json::Value]) -> Vec<u8> {
            serde_json::to_vec(
                &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs}),
            )
            .unwrap()
        }

        fn handler(self) -> impl Fn(&Req) -> Resp + Send + Sync {
            move |r: &Req| {
                let Some(rest) = r.path.strip_prefix("/v2/app/") else {
                    return not_found();
                };
                if let Some(subject) = rest.strip_prefix("referrers/") {
                    let subject = subject.split('?').next().unwrap();
                    return match &self.referrers {
                        None => not_found(),
                        Some(m) => resp(
                            200,
                            OCI_INDEX,
                            &Self::referrers_index(
                                m.get(subject).map(Vec::as_slice).unwrap_or(&[]),
                            ),
                        ),
                    };
                }
                if let Some(reference) = rest.strip_prefix("manifests/") {
                    if let Some((mt, body)) = self.manifests.get(reference) {
                        let mut x = resp(200, mt, body);
                        x.headers
                            .push(("Docker-Content-Digest".into(), sha256_digest(body)));
                        return x;
                    }
                }
                not_found()
            }
        }
    }

    fn opts(plain: bool) -> RegistryOptions {
        RegistryOptions {
            plain_http: plain,
            arch: "amd64".into(),
            timeout: Duration::from_secs(5),
            ..Default::default()
        }
    }

    fn start(c: Content) -> Fake {
        Fake::start(Arc::new(c.handler()))
    }

    // -- tests --------------------------------------------------------------

    #[test]
    fn referrers_api_hit() {
        let mut c = Content::default();
        let img = c.image(Some("v1"), serde_json::json!({}));
        let desc = c.soci_v1(&img);
        let other = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "e".repeat(64)), "size": 1, "artifactType": "application/vnd.example.sbom"});
        c.referrers = Some(BTreeMap::from([(img.clone(), vec![other, desc.clone()])]));
        let f = start(c);
        let r = soci_index(&format!("{}/app:v1", f.addr), &opts(true)).unwrap();
        assert!(r.lazy, "{r:?}");
        assert_eq!(r.digest, img);
        assert_eq!(r.referrers_api, Some(true));
        assert_eq!(r.indexes.len(), 1, "only SOCI artifacts: {r:?}");
        assert_eq!(r.indexes[0].via, Via::Referrers);
        assert_eq!(r.indexes[0].digest, desc["digest"].as_str().unwrap());
        assert!(r.message.starts_with("SOCI index found"), "{}", r.message);
        assert!(r.message.ends_with("pull will be lazy"), "{}", r.message);
        let paths = f.paths();
        assert!(
            paths.iter().any(|p| p.contains("referrers/sha256:")
                && p.contains("artifactType=application%2Fvnd.amazon.soci.index.v1%2Bjson")),
            "{paths:?}"
        );
        assert!(
            !paths.iter().any(|p| p.contains("manifests/sha256-")),
            "{paths:?}"
        );
    }

    #[test]
    fn no_referrers_api_falls_back_to_the_tag() {
        let mut c = Content::default();
        let img = c.image(Some("v1"), serde_json::json!({}));
        let desc = c.soci_v1(&img);
        let tag = img.replacen(':', "-", 1);
        let list =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]});
        c.put(Some(&tag), OCI_INDEX, &list);
        let f = start(c);
        let r = soci_index(&format!("{}/app:v1", f.addr), &opts(true)).unwrap();
        assert!(r.lazy, "{r:?}");
        assert_eq!(r.referrers_api, Some(false));
        assert_eq!(r.indexes[0].via, Via::Tag);
        assert!(r.message.contains(&tag), "{}", r.message);
    }

    #[test]
    fn neither_means_a_full_pull() {
        let mut c = Content::default();
        c.image(Some("v1"), serde_json::json!({}));
        let f = start(c);
        let r = soci_index(&format!("{}/app:v1", f.addr), &opts(true)).unwrap();
        assert!(!r.lazy);
        assert!(r.indexes.is_empty());
        assert_eq!(r.referrers_api, Some(false));
        assert!(r.message.starts_with("no SOCI index"), "{}", r.message);
        assert!(r.message.ends_with("full pull"), "{}", r.message);
    }

    #[test]
    fn an_empty_referrers_answer_is_final_like_in_the_snapshotter() {
        let mut c = Content::default();
        let img = c.image(Some("v1"), serde_json::json!({}));
        let desc = c.soci_v1(&img);
        let list =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]});
        c.put(Some(&img.replacen(':', "-", 1)), OCI_INDEX, &list);
        c.referrers = Some(BTreeMap::new());
        let f = start(c);
        let r = soci_index(&format!("{}/app:v1", f.addr), &opts(true)).unwrap();
        assert!(!r.lazy, "{r:?}");
        assert_eq!(r.referrers_api, Some(true));
        assert!(!f.paths().iter().any(|p| p.contains("sha256-")));
    }

    fn token_server(c: Content, want_basic: Option<&'static str>) -> (Fake, Arc<Mutex<String>>) {
        let inner = c.handler();
        let realm = Arc::new(Mutex::new(String::new()));
        let realm2 = realm.clone();
        let f = Fake::start(Arc::new(move |r: &Req| {
            if r.path.starts_with("/token?") {
                if let Some(b) = want_basic {
                    let want = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(b)
                    );
                    if r.header("authorization") != Some(want.as_str()) {
                        return resp(401, "application/json", b"{}");
                    }
                }
                return resp(
                    200,
                    "application/json",
                    br#"{"token":"tok-1","expires_in":300}"#,
                );
            }
            if r.header("authorization") == Some("Bearer tok-1") {
                return inner(r);
            }
            let mut x = resp(
                401,
                "application/json",
                br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
            );
            x.headers.push((
                "WWW-Authenticate".into(),
                format!(
                    r#"Bearer realm="{}/token",service="fake-registry",scope="repository:app:pull""#,
                    realm2.lock().unwrap()
                ),
            ));
            x
        }));
        *realm.lock().unwrap() = format!("http://{}", f.addr);
        (f, realm)
    }

    #[test]
    fn bearer_token_flow_anonymous() {
        let mut c = Content::default();
        c.image(Some("v1"), serde_json::json!({}));
        let (f, _) = token_server(c, None);
        let r = soci_index(&format!("{}/app:v1", f.addr), &opts(true)).unwrap();
        assert!(!r.lazy);
        let reqs = f.requests();
        let token_reqs: Vec<_> = reqs
            .iter()
            .filter(|r| r.path.starts_with("/token"))
            .collect();
        assert_eq!(
            token_reqs.len(),
            1,
            "one token for the whole check: {:?}",
            f.paths()
        );
        assert!(
            token_reqs[0].path.contains("service=fake-registry")
                && token_reqs[0].path.contains("scope=repository%3Aapp%3Apull"),
            "{}",
            token_reqs[0].path
        );
        assert_eq!(token_reqs[0].header("authorization"), None);
    }

    fn docker_config(dir: &Path, json: serde_json::Value) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, serde_json::to_vec(&json).unwrap()).unwrap();
        p
    }

    #[test]
    fn bearer_token_flow_with_docker_config_credentials() {
        let mut c = Content::default();
        c.image(Some("v1"), serde_json::json!({}));
        let (f, _) = token_server(c, Some("alice:s3cret"));
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(true);
        // Without credentials the token service refuses.
        let e = soci_index(&format!("{}/app:v1", f.addr), &o).unwrap_err();
        assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");
        assert!(e.to_string().contains("anonymous"), "{e}");
        o.docker_config = Some(docker_config(
            d.path(),
            serde_json::json!({"auths": {format!("http://{}", f.addr): {
                "auth": base64::engine::general_purpose::STANDARD.encode("alice:s3cret")}}}),
        ));
        let r = soci_index(&format!("{}/app:v1", f.addr), &o).unwrap();
        assert_eq!(r.referrers_api, Some(false));
    }

    fn basic_server(c: Content, user_pass: &'static str) -> Fake {
        let inner = c.handler();
        Fake::start(Arc::new(move |r: &Req| {
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(user_pass)
            );
            if r.header("authorization") == Some(want.as_str()) {
                return inner(r);
            }
            let mut x = resp(401, "text/plain", b"auth");
            x.headers
                .push(("WWW-Authenticate".into(), r#"Basic realm="fake""#.into()));
            x
        }))
    }

    #[test]
    fn basic_auth_from_the_docker_config() {
        let mut c = Content::default();
        let img = c.image(Some("v1"), serde_json::json!({}));
        let desc = c.soci_v1(&img);
        c.referrers = Some(BTreeMap::from([(img, vec![desc])]));
        let f = basic_server(c, "bob:pw");
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(true);
        let e = soci_index(&format!("{}/app:v1", f.addr), &o).unwrap_err();
        assert!(e.to_string().contains("no credentials"), "{e}");
        // `auth` form.
        o.docker_config = Some(docker_config(
            d.path(),
            serde_json::json!({"auths": {f.addr.clone(): {"auth": base64::engine::general_purpose::STANDARD.encode("bob:pw")}}}),
        ));
        assert!(soci_index(&format!("{}/app:v1", f.addr), &o).unwrap().lazy);
        // username/password form.
        o.docker_config = Some(docker_config(
            d.path(),
            serde_json::json!({"auths": {f.addr.clone(): {"username": "bob", "password": "pw"}}}),
        ));
        assert!(soci_index(&format!("{}/app:v1", f.addr), &o).unwrap().lazy);
        // Wrong password: said so.
        o.docker_config = Some(docker_config(
            d.path(),
            serde_json::json!({"auths": {f.addr.clone(): {"username": "bob", "password": "no"}}}),
        ));
        let e = soci_index(&format!("{}/app:v1", f.addr), &o).unwrap_err();
        assert!(e.to_string().contains("configured credentials"), "{e}");
    }

    #[test]
    fn credential_helper_gets_the_host_on_stdin() {
        let mut c = Content::default();
        c.image(Some("v1"), serde_json::json!({}));
        let f = basic_server(c, "AWS:tok3n");
        let d = tempfile::tempdir().unwrap();
        let seen = d.path().join("stdin");
        let helper = d.path().join("docker-credential-fake");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 2\ncat > {}\necho '{{\"ServerURL\":\"x\",\"Username\":\"AWS\",\"Secret\":\"tok3n\"}}'\n",
                seen.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut o = opts(true);
        o.helper_dirs = vec![d.path().to_path_buf()];
        o.docker_config = Some(docker_config(
            d.path(),
            serde_json::json!({"credHelpers": {f.addr.clone(): "fake"}, "auths": {f.addr.clone(): {"username": "wrong", "password": "wrong"}}}),
        ));
        let r = soci_index(&format!("{}/app:v1", f.addr), &o).unwrap();
        assert!(!r.lazy);
        assert_eq!(std::fs::read_to_string(&seen).unwrap().trim(), f.addr);
        // A helper that is not installed is an error that names it.
        o.docker_config = Some(docker_config(
            d.path(),
            serde_json::json!({"credHelpers": {f.addr.clone(): "ecr-login"}}),
        ));
        let e = soci_index(&format!("{}/app:v1", f.addr), &o).unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-ecr-login is not installed"),
            "{e}"
        );
        // A hung helper is bounded.
        std::fs::write(&helper, "#!/bin/sh\nsleep 30\n").unwrap();
        o.helper_timeout = Duration::from_millis(300);
        o.docker_config = Some(docker_config(
            d.path(),
            serde_json::json!({"credHelpers": {f.addr.clone(): "fake"}}),
        ));
        let t = Instant::now();
        let e = soci_index(&format!("{}/app:v1", f.addr), &o).unwrap_err();
        assert!(e.to_string().contains("still running"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn image_index_uses_the_platform_manifest_and_finds_v2_indexes() {
        let mut c = Content::default();
        let arm = c.image(None, serde_json::json!({}));
        let soci_v2 = c.put(
            None,
            OCI_MANIFEST,
            &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SOCI_INDEX_V2,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": format!("sha256:{}", "4".repeat(64)), "size": 2}, "layers": []}),
        );
        let amd = c.image(
            None,
            serde_json::json!({ANNOTATION_INDEX_DIGEST: soci_v2.clone()}),
        );
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": arm, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": OCI_MANIFEST, "digest": amd, "size": 1, "platform": {"os": "linux", "architecture": "amd64"},
             "annotations": {ANNOTATION_INDEX_DIGEST: soci_v2.clone()}},
            {"mediaType": OCI_MANIFEST, "digest": soci_v2, "size": 1, "artifactType": SOCI_INDEX_V2,
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]});
        let idx = c.put(Some("multi"), OCI_INDEX, &index);
        let f = start(c);
        let r = soci_index(&format!("{}/app:multi", f.addr), &opts(true)).unwrap();
        assert_eq!(r.digest, amd, "the amd64 manifest");
        assert_eq!(r.index_digest.as_deref(), Some(idx.as_str()));
        assert!(r.lazy, "{r:?}");
        assert_eq!(r.indexes[0].via, Via::Annotation);
        assert_eq!(r.indexes[0].artifact_type, SOCI_INDEX_V2);
        // Both the manifest and the index digest were looked up.
        let paths = f.paths();
        for d in [&amd, &idx] {
            assert!(
                paths.iter().any(|p| p.contains(&d.replacen(':', "-", 1))),
                "{d} not checked: {paths:?}"
            );
        }

        let mut o = opts(true);
        o.arch = "s390x".into();
        let e = soci_index(&format!("{}/app:multi", f.addr), &o).unwrap_err();
        assert!(e.to_string().contains("linux/arm64, linux/amd64"), "{e}");
    }

    #[test]
    fn an_index_on_the_image_index_only_is_not_lazy() {
        let mut c = Content::default();
        let amd = c.image(None, serde_json::json!({}));
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": amd, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}}]});
        let idx = c.put(Some("multi"), OCI_INDEX, &index);
        let desc = c.soci_v1(&idx);
        c.referrers = Some(BTreeMap::from([(idx.clone(), vec![desc])]));
        let f = start(c);
        let r = soci_index(&format!("{}/app:multi", f.addr), &opts(true)).unwrap();
        assert!(!r.lazy, "{r:?}");
        assert_eq!(r.indexes.len(), 1);
        assert_eq!(r.indexes[0].subject, idx);
        assert!(r.message.contains("SOCI does not look"), "{}", r.message);
    }

    #[test]
    fn a_dangling_v2_annotation_does_not_count() {
        let mut c = Content::default();
        c.image(
            Some("v1"),
            serde_json::json!({ANNOTATION_INDEX_DIGEST: format!("sha256:{}", "9".repeat(64))}),
        );
        let f = start(c);
        let r = soci_index(&format!("{}/app:v1", f.addr), &opts(true)).unwrap();
        assert!(!r.lazy);
        assert!(r.message.contains("does not have"), "{}", r.message);
    }

    #[test]
    fn missing_image_and_a_digest_mismatch_are_errors() {
        let c = Content::default();
        let f = start(c);
        let e = soci_index(&format!("{}/app:nope", f.addr), &opts(true)).unwrap_err();
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
        let f = Fake::start(Arc::new(|_r: &Req| {
            let mut x = resp(200, OCI_MANIFEST, br#"{"schemaVersion":2}"#);
            x.headers.push((
                "Docker-Content-Digest".into(),
                format!("sha256:{}", "0".repeat(64)),
            ));
            x
        }));
        let e = soci_index(&format!("{}/app:v1", f.addr), &opts(true)).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn a_silent_registry_costs_at_most_the_bound() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let held = std::thread::spawn(move || {
            let c = l.accept();
            std::thread::sleep(Duration::from_millis(1500));
            drop(c);
        });
        let mut o = opts(true);
        o.timeout = Duration::from_millis(500);
        let t = Instant::now();
        let e = soci_index(&format!("{addr}/app:v1"), &o).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(e.to_string().contains("timed out"), "{e}");
        // A closed port fails fast.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = soci_index(&format!("{closed}/app:v1"), &o).unwrap_err();
        assert!(e.to_string().contains("cannot connect"), "{e}");
        held.join().unwrap();
    }

    #[test]
    fn references_are_normalized_like_docker() {
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = ImageRef::parse("bitnami/redis:7.2").unwrap();
        assert_eq!(r.repository, "bitnami/redis");
        assert_eq!(r.registry, "docker.io");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("127.0.0.1:5000/team/app:v1@{d}")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("v1"))
        );
        assert_eq!(r.reference(), d);
        let r = ImageRef::parse("localhost/kubernetes/pause").unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.reference(), "latest");
        let r = ImageRef::parse("123456789012.dkr.ecr.us-west-2.amazonaws.com/app:1").unwrap();
        assert_eq!(r.api_host(), "123456789012.dkr.ecr.us-west-2.amazonaws.com");
        let r = ImageRef::parse("index.docker.io/library/busybox@".to_string().as_str());
        assert!(r.is_err());
        for bad in [
            "",
            "Nginx",
            "a b",
            "https://x/y",
            "x/y:",
            "x@sha256:abc",
            "x@md5:00",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["scope"], "repository:library/nginx:pull,push");
        let c = parse_challenge("Basic realm=registry").unwrap();
        assert_eq!(
            (c.scheme.as_str(), c.params["realm"].as_str()),
            ("basic", "registry")
        );
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn docker_hub_credentials_use_hubs_keys() {
        let d = tempfile::tempdir().unwrap();
        let o = RegistryOptions {
            docker_config: Some(docker_config(
                d.path(),
                serde_json::json!({"auths": {"https://index.docker.io/v1/": {"auth": base64::engine::general_purpose::STANDARD.encode("u:hunter2")}}}),
            )),
            ..Default::default()
        };
        let c = credential_for("docker.io", &o).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.secret.as_str()), ("u", "hunter2"));
        assert_eq!(credential_for("quay.io", &o).unwrap(), None);
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "secrets stay out of logs"
        );
    }
}
