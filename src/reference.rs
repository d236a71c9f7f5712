//! Image references as users type them, normalised.
//!
//! Registry references follow Docker's grammar (distribution's `reference` package):
//! `alpine` is `docker.io/library/alpine:latest`. Two transport prefixes, as skopeo spells
//! them, name local images: `oci:DIR[:TAG]` and `docker-archive:FILE[:REF]`.
//!
//! Parsed by hand rather than with oci-spec's `Reference`: that compiles Docker's reference
//! regex (with Unicode classes) on first use, ~40 ms in every process — most of a warm
//! `imgfs mount`. The grammar is small and is checked rule by rule here.

use std::fmt;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Where an image comes from and which one it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    Registry(RegistryRef),
    /// An OCI image layout directory; `tag` matches `org.opencontainers.image.ref.name`.
    OciLayout {
        dir: PathBuf,
        tag: Option<String>,
    },
    /// A `docker save` tarball; `reference` matches one of its `RepoTags`.
    DockerArchive {
        file: PathBuf,
        reference: Option<String>,
    },
}

/// A normalised registry reference. At least one of `tag` and `digest` is set; when both are,
/// the digest decides what is fetched and the tag is only reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRef {
    /// `docker.io`, `quay.io`, `127.0.0.1:5000`…
    pub registry: String,
    /// `library/alpine`, `a/b/c`…
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl RegistryRef {
    /// Parse a Docker-style reference, applying Docker's defaults.
    pub fn parse(input: &str) -> Result<RegistryRef> {
        let err = |reason: &str| Error::Reference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let format =
            || err("invalid reference format (expected [HOST[:PORT]/]NAME[:TAG][@sha256:HEX])");
        if input.is_empty() {
            return Err(format());
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|e| err(&e.to_string()))?)),
            None => (input, None),
        };
        // A tag follows the last ':' that comes after the last '/' (a port comes before it).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(err(
                    "invalid tag (letters, digits, '_', '.', '-'; at most 128)",
                ));
            }
        }
        // Docker's rule: the first component is a registry host if it has a '.' or ':', is
        // "localhost", or has uppercase letters (which repository names cannot).
        let (registry, repository) = match name.split_once('/') {
            Some((first, remote))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first.to_string(), remote.to_string())
            }
            _ if !name.contains('/') => ("docker.io".to_string(), format!("library/{name}")),
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if !valid_host(&registry) {
            return Err(err(&format!("invalid registry host {registry:?}")));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err("repository name must be lowercase"));
        }
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(format());
        }
        if repository.len() > 255 {
            return Err(err("repository name must not be more than 255 characters"));
        }
        Ok(RegistryRef {
            registry,
            repository,
            // Docker's default tag, unless pinned by digest.
            tag: tag
                .map(str::to_string)
                .or_else(|| digest.is_none().then(|| "latest".to_string())),
            digest,
        })
    }

    /// What to ask the registry for: the digest when known, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same repository, pinned to `digest`.
    pub fn with_digest(&self, digest: Digest) -> RegistryRef {
        RegistryRef {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_lowercase() || b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator: '.', '_', "__", or a run of '-'; then an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start
            || !b
                .get(i)
                .is_some_and(|x| x.is_ascii_lowercase() || x.is_ascii_digit())
        {
            return false;
        }
    }
    true
}

/// `host[:port]`: DNS labels (letters, digits, inner '-') joined by '.', an IPv4 address, or a
/// bracketed IPv6 address.
fn valid_host(h: &str) -> bool {
    let (host, port) = match h.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) => {
                if addr.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                ("v6", rest.strip_prefix(':'))
            }
            None => return false,
        },
        None => match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        },
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    host == "v6"
        || (!host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }))
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

impl ImageRef {
    /// Parse what a user typed: `oci:…`, `docker-archive:…`, `docker://…` or a bare reference.
    pub fn parse(input: &str) -> Result<ImageRef> {
        if let Some(rest) = input.strip_prefix("oci:") {
            let (dir, tag) = split_path_suffix(rest);
            return Ok(ImageRef::OciLayout {
                dir: nonempty_path(input, dir)?,
                tag,
            });
        }
        if let Some(rest) = input.strip_prefix("docker-archive:") {
            let (file, reference) = split_path_suffix(rest);
            return Ok(ImageRef::DockerArchive {
                file: nonempty_path(input, file)?,
                reference,
            });
        }
        let bare = input.strip_prefix("docker://").unwrap_or(input);
        if let Some((scheme, rest)) = bare.split_once("://") {
            return Err(Error::Reference {
                input: input.to_string(),
                reason: format!(
                    "references have no scheme: write {rest:?}{}",
                    if scheme == "http" {
                        " (a registry on another host than loopback is reached over plain \
                         HTTP with --insecure-registry HOST[:PORT])"
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(ImageRef::Registry(RegistryRef::parse(bare)?))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry(r) => r.fmt(f),
            ImageRef::OciLayout { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                tag.iter().try_for_each(|t| write!(f, ":{t}"))
            }
            ImageRef::DockerArchive { file, reference } => {
                write!(f, "docker-archive:{}", file.display())?;
                reference.iter().try_for_each(|r| write!(f, ":{r}"))
            }
        }
    }
}

/// Split `PATH[:SUFFIX]` at the first colon, as skopeo does: the suffix (a tag or a full
/// reference such as `repo/x:1`) may contain colons, a path may not.
fn split_path_suffix(s: &str) -> (&str, Option<String>) {
    match s.split_once(':') {
        Some((path, rest)) if !path.is_empty() && !rest.is_empty() => {
            (path, Some(rest.to_string()))
        }
        _ => (s, None),
    }
}

fn nonempty_path(input: &str, p: &str) -> Result<PathBuf> {
    if p.is_empty() {
        return Err(Error::Reference {
            input: input.to_string(),
            reason: "missing path after the transport prefix".into(),
        });
    }
    Ok(PathBuf::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> RegistryRef {
        RegistryRef::parse(s).unwrap()
    }

    #[test]
    fn docker_hub_defaults() {
        let r = reg("alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            reg("user/app:1.0").to_string(),
            "docker.io/user/app:1.0",
            "a single path component is a Docker Hub user, not a host"
        );
    }

    #[test]
    fn host_with_port_and_nested_repository() {
        let r = reg("host:5000/a/b:tag");
        assert_eq!(r.registry, "host:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(reg("localhost/x").registry, "localhost");
    }

    #[test]
    fn digest_and_tag_plus_digest() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = reg(&format!("name@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), d);
        let r = reg(&format!("name:v1@{d}"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), d, "the digest wins over the tag");
        assert_eq!(r.to_string(), format!("docker.io/library/name:v1@{d}"));
    }

    #[test]
    fn grammar_errors_say_what_is_wrong() {
        let e = RegistryRef::parse("Alpine").unwrap_err().to_string();
        assert!(e.contains("lowercase"), "{e}");
        let e = RegistryRef::parse("a@sha256:123").unwrap_err().to_string();
        assert!(e.contains("digest"), "{e}");
        let e = RegistryRef::parse("a:b:c").unwrap_err().to_string();
        assert!(e.contains("\"a:b:c\""), "{e}");
        assert!(RegistryRef::parse("").is_err());
    }

    #[test]
    fn the_grammar_rule_by_rule() {
        for ok in [
            "a__b/c.d/e-f--g:1.0_x-y",
            "[::1]:5000/a/b",
            "10.0.0.1:443/x",
            "my-host.example.com/team/app",
            "localhost:5000/a",
            "UPPERHOST.example/x",
        ] {
            RegistryRef::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert_eq!(reg("localhost:5000/a").registry, "localhost:5000");
        for bad in [
            "a_/b",
            "a..b",
            "-a",
            "a:",
            "a:-tag",
            "a/b:",
            "host:port/x",
            "[::1/x",
            "a//b",
            &format!("a:{}", "t".repeat(129)),
            &format!("x/{}", "a".repeat(256)),
        ] {
            assert!(RegistryRef::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn local_transports() {
        assert_eq!(
            ImageRef::parse("oci:/tmp/lay:v1").unwrap(),
            ImageRef::OciLayout {
                dir: "/tmp/lay".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:/tmp/lay").unwrap(),
            ImageRef::OciLayout {
                dir: "/tmp/lay".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("docker-archive:/tmp/a.tar:repo/x:1").unwrap(),
            ImageRef::DockerArchive {
                file: "/tmp/a.tar".into(),
                reference: Some("repo/x:1".into())
            }
        );
        assert!(ImageRef::parse("oci:").is_err());
        assert!(matches!(
            ImageRef::parse("docker://alpine").unwrap(),
            ImageRef::Registry(_)
        ));
    }
}
