//! Image references as users type them, normalised.
//!
//! Registry references follow Docker's grammar (parsed by `oci-spec`, which ports Docker's own
//! regular expression): `alpine` is `docker.io/library/alpine:latest`. Two transport prefixes,
//! as skopeo spells them, name local images: `oci:DIR[:TAG]` and `docker-archive:FILE[:REF]`.

use std::fmt;
use std::path::PathBuf;

use oci_spec::distribution::Reference;

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
        let err = |reason: String| Error::Reference {
            input: input.to_string(),
            reason,
        };
        // Check the digest first: Docker's regex reports a short digest as a format error.
        if let Some((_, d)) = input.rsplit_once('@') {
            Digest::parse(d).map_err(|e| err(e.to_string()))?;
        }
        let parsed: Reference = input.parse().map_err(|e| {
            // Docker's regex rejects uppercase as a generic format error; say what is wrong.
            if input.to_ascii_lowercase().parse::<Reference>().is_ok() {
                err("repository name must be lowercase".into())
            } else {
                err(format!(
                    "{e} (expected [HOST[:PORT]/]NAME[:TAG][@sha256:HEX])"
                ))
            }
        })?;
        if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err("repository name must be lowercase".into()));
        }
        let digest = parsed
            .digest()
            .map(Digest::parse)
            .transpose()
            .map_err(|e| err(e.to_string()))?;
        Ok(RegistryRef {
            registry: parsed.registry().to_string(),
            repository: parsed.repository().to_string(),
            tag: parsed.tag().map(str::to_string),
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
