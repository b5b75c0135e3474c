//! Versions of the binaries soci-node drives, parsed from their `--version`.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }

    /// The first `X.Y[.Z]` token in a `--version` line, tolerating a `v`
    /// prefix and distro suffixes: `containerd github.com/containerd/containerd
    /// 1.6.20~ds1 1.6.20~ds1-1+deb12u3`, `soci-snapshotter-grpc version
    /// v0.11.1 3f1b...`, `containerd containerd.io 2.2.0+unknown`.
    pub fn find_in(text: &str) -> Option<Version> {
        text.split(|c: char| c.is_whitespace())
            .filter_map(|tok| Version::parse_token(tok.trim_start_matches('v')))
            .next()
    }

    fn parse_token(tok: &str) -> Option<Version> {
        let end = tok
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(tok.len());
        let core = &tok[..end];
        let mut parts = core.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            Some(p) if !p.is_empty() => p.parse().ok()?,
            _ => 0,
        };
        // Reject tokens like "2.0.0.1.2" that are not versions at all.
        if parts.next().is_some() {
            return None;
        }
        Some(Version::new(major, minor, patch))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_version_lines() {
        let cases = [
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
                (1, 6, 20),
            ),
            (
                "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1",
                (1, 7, 24),
            ),
            (
                "containerd github.com/containerd/containerd/v2 2.1.9+unknown ",
                (2, 1, 9),
            ),
            ("containerd containerd.io v2.2.0 1c4457e", (2, 2, 0)),
            ("soci version 0.4.1-6 0.4.1-6", (0, 4, 1)),
            ("soci-snapshotter-grpc version v0.11.1 3f1b4e3", (0, 11, 1)),
        ];
        for (line, (a, b, c)) in cases {
            assert_eq!(
                Version::find_in(line),
                Some(Version::new(a, b, c)),
                "{line}"
            );
        }
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(Version::find_in("segmentation fault"), None);
        assert_eq!(Version::find_in(""), None);
        assert_eq!(
            Version::find_in("github.com/containerd/containerd/v2"),
            None
        );
    }

    #[test]
    fn ordering() {
        assert!(Version::new(0, 10, 0) > Version::new(0, 4, 1));
        assert!(Version::new(2, 1, 0) > Version::new(1, 7, 24));
    }
}
