//! Token authentication (`--auth FILE`, PROTOCOL.md section 8): the tokens
//! a server accepts, kept as SHA-256 digests (never in clear), each with
//! its rights: the topic prefixes it may produce to, the topic prefixes it
//! may read, and the consumer groups it may use.
//!
//! The file has one token per line (`#` starts a comment):
//!
//! ```text
//! token NAME SHA256_HEX [produce=PREFIX,...] [read=PREFIX,...] [groups=GROUP,...]
//! ```
//!
//! `*` in a list is every topic (or group); a right left out is none. The
//! digest is of the token's bytes as the client sends them
//! (`printf %s "$TOKEN" | sha256sum`). A token is looked up by comparing
//! its digest with every line's, in constant time, with no early exit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One token's rights.
#[derive(Debug, PartialEq, Eq)]
pub struct Rights {
    /// The line's name (for logs; never the token).
    pub name: String,
    digest: [u8; 32],
    produce: Vec<Vec<u8>>,
    read: Vec<Vec<u8>>,
    groups: Vec<Vec<u8>>,
}

/// Whether `value` starts with one of `prefixes` (`*`: always).
fn allowed(prefixes: &[Vec<u8>], value: &[u8]) -> bool {
    prefixes.iter().any(|p| p == b"*" || value.starts_with(p))
}

impl Rights {
    /// Whether an event to `topic` is allowed.
    pub fn may_produce(&self, topic: &[u8]) -> bool {
        allowed(&self.produce, topic)
    }

    /// Whether a read of the topics starting with `prefix` (empty: every
    /// topic) is allowed: the whole of it must lie inside a read right.
    pub fn may_read(&self, prefix: &[u8]) -> bool {
        allowed(&self.read, prefix)
    }

    /// Whether the consumer group `group` is allowed.
    pub fn may_use_group(&self, group: &[u8]) -> bool {
        self.groups.iter().any(|g| g == b"*" || g == group)
    }
}

/// What a connection may do.
#[derive(Clone, Debug)]
pub enum Access {
    /// Authentication is off: everything.
    Open,
    /// Authentication is on and no HELLO was accepted: nothing (a legacy
    /// connection may still produce to `--legacy-unauthenticated`).
    Anonymous,
    /// A HELLO with this token's rights.
    Token(Arc<Rights>),
}

impl Access {
    /// Whether an event to `topic` is allowed.
    pub fn may_produce(&self, topic: &[u8]) -> bool {
        match self {
            Access::Open => true,
            Access::Anonymous => false,
            Access::Token(r) => r.may_produce(topic),
        }
    }
}

/// The tokens a server accepts.
#[derive(Debug, Default)]
pub struct Auth {
    tokens: Vec<Arc<Rights>>,
}

pub use eventstream_core::wire::read::MAX_TOKEN;

/// The token in the file the flag `flag` names (`None`: no flag): its
/// first line without surrounding white space, 1..=`max` bytes. Tokens are
/// kept in files, never on a command line.
pub fn token_file(flag: &str, path: Option<&Path>, max: usize) -> Result<Option<String>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() || token.len() > max {
        return Err(format!(
            "{flag} {}: the first line must hold a token of 1..={max} bytes",
            path.display()
        ));
    }
    Ok(Some(token.to_string()))
}

/// A HELLO token from `--token-file` (the client commands).
pub fn hello_token(path: Option<&Path>) -> Result<Option<Vec<u8>>, String> {
    Ok(token_file("--token-file", path, MAX_TOKEN)?.map(String::into_bytes))
}

/// The SHA-256 digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Whether two digests are equal, in constant time.
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    same(a, b)
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Auth {
    /// Reads `path`; an error names the file and line.
    pub fn load(path: &Path) -> Result<Auth, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("--auth {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--auth {}: {e}", path.display()))
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Auth, String> {
        let mut tokens: Vec<Arc<Rights>> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", n + 1);
            let mut words = line.split_whitespace();
            if words.next() != Some("token") {
                return Err(bad(
                    "expected `token NAME SHA256_HEX [produce=..] [read=..] [groups=..]`",
                ));
            }
            let name = words.next().ok_or_else(|| bad("no name"))?.to_string();
            let digest = words
                .next()
                .and_then(unhex32)
                .ok_or_else(|| bad("the digest is not 64 hex digits (SHA-256 of the token)"))?;
            let mut rights = Rights {
                name,
                digest,
                produce: Vec::new(),
                read: Vec::new(),
                groups: Vec::new(),
            };
            for w in words {
                let (key, list) = w
                    .split_once('=')
                    .ok_or_else(|| bad(&format!("{w:?}: expected KEY=VALUE,...")))?;
                let items: Vec<Vec<u8>> = list
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.as_bytes().to_vec())
                    .collect();
                match key {
                    "produce" => rights.produce.extend(items),
                    "read" => rights.read.extend(items),
                    "groups" => rights.groups.extend(items),
                    _ => {
                        return Err(bad(&format!(
                            "unknown right {key:?} (produce, read, groups)"
                        )))
                    }
                }
            }
            if tokens.iter().any(|t| t.name == rights.name) {
                return Err(bad(&format!("the name {:?} twice", rights.name)));
            }
            if tokens.iter().any(|t| same(&t.digest, &rights.digest)) {
                return Err(bad("the same token twice"));
            }
            tokens.push(Arc::new(rights));
        }
        Ok(Auth { tokens })
    }

    /// The rights of `token`, if it is one of the file's.
    pub fn check(&self, token: &[u8]) -> Option<Arc<Rights>> {
        let d = sha256(token);
        let mut found = None;
        for t in &self.tokens {
            if same(&t.digest, &d) {
                found = Some(t.clone());
            }
        }
        found
    }

    /// The rights this file gives the token of `rights` (None: revoked).
    pub fn refresh(&self, rights: &Rights) -> Option<Arc<Rights>> {
        self.tokens
            .iter()
            .find(|t| t.name == rights.name && same(&t.digest, &rights.digest))
            .cloned()
    }

    /// How many tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The `--auth` file as loaded, re-read on SIGHUP.
#[derive(Debug)]
pub struct AuthState {
    path: PathBuf,
    current: Mutex<Arc<Auth>>,
    generation: AtomicU64,
}

impl AuthState {
    /// Loads `path`; errors are one line.
    pub fn load(path: &Path) -> Result<AuthState, String> {
        Ok(AuthState {
            path: path.to_path_buf(),
            current: Mutex::new(Arc::new(Auth::load(path)?)),
            generation: AtomicU64::new(0),
        })
    }

    /// The tokens now.
    pub fn current(&self) -> Arc<Auth> {
        crate::storage::locked(&self.current).clone()
    }

    /// Changes at each reload (one load: cheap to check once per loop).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the file again; a file that does not load leaves the tokens
    /// as they were. Returns how many tokens there are now.
    pub fn reload(&self) -> Result<usize, String> {
        let auth = Auth::load(&self.path)?;
        let n = auth.len();
        *crate::storage::locked(&self.current) = Arc::new(auth);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn tokens_are_found_by_digest_with_their_rights() {
        // The known SHA-256 of "abc".
        assert_eq!(
            hex(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let text = format!(
            "# producers\ntoken alice {} produce=orders.,audit read=orders. groups=billing\ntoken ops {} produce=* read=* groups=*\n",
            hex(sha256(b"alice-secret")),
            hex(sha256(b"ops-secret"))
        );
        let auth = Auth::parse(&text).unwrap();
        assert_eq!(auth.len(), 2);
        let a = auth.check(b"alice-secret").unwrap();
        assert_eq!(a.name, "alice");
        assert!(a.may_produce(b"orders.eu") && a.may_produce(b"audit"));
        assert!(!a.may_produce(b"payments") && !a.may_produce(b"order"));
        assert!(a.may_read(b"orders.eu") && !a.may_read(b"") && !a.may_read(b"audit"));
        assert!(a.may_use_group(b"billing") && !a.may_use_group(b"billing2"));
        let o = auth.check(b"ops-secret").unwrap();
        assert!(o.may_produce(b"x") && o.may_read(b"") && o.may_use_group(b"any"));
        assert!(auth.check(b"alice-secreT").is_none() && auth.check(b"").is_none());
        assert!(auth.refresh(&a).is_some());
        let reloaded = Auth::parse(&text.replace("token ops", "# token ops")).unwrap();
        assert!(reloaded.refresh(&a).is_some() && reloaded.refresh(&o).is_none());
    }

    #[test]
    fn bad_files_name_their_line() {
        let d = hex(sha256(b"x"));
        for (text, want) in [
            ("tok a b", "line 1"),
            ("token a", "line 1"),
            ("\ntoken a abc", "line 2: the digest"),
            (&format!("token a {d} write=x") as &str, "unknown right"),
            (
                &format!("token a {d}\ntoken a {}", hex(sha256(b"y"))),
                "twice",
            ),
            (&format!("token a {d}\ntoken b {d}"), "same token twice"),
        ] {
            let e = Auth::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
