//! `imgfs snapshotter`: a containerd proxy snapshotter. It keeps snapshots as containerd's
//! overlayfs snapshotter does, except that a layer an unpack asks for by its labels
//! (`labels.rs`) is served lazily from the layer store (`crate::store`, mounted over FUSE at
//! `<root>/layers` by the cli) and committed under its target name at once, and containerd,
//! told ALREADY_EXISTS, downloads nothing. A layer that cannot be served that way is
//! unpacked by containerd as usual, and the reason is logged and counted in `<root>/status`:
//! never a silent full pull. This module is the model; `service.rs` speaks the gRPC API;
//! containerd's expectations are in docs/snapshotter-research.md.

pub mod api;
mod filter;
mod labels;
mod layout;
pub mod service;
mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use layout::Mount;
pub use state::{Kind, Record};

use crate::store::{Recent, Store};
use labels::Ask;
use state::{Remote, State};

/// What a snapshot operation can answer; service.rs maps each to the gRPC code containerd
/// reads it by.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("snapshotter state: {0}")]
    State(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub struct Snapshotter {
    root: PathBuf,
    state: State,
    store: Arc<Store>,
    rt: tokio::runtime::Handle,
    served: AtomicU64,
    fallbacks: AtomicU64,
    recent: Recent,
}

impl Snapshotter {
    /// The snapshotter over `root` (created if new; a killed daemon's state loads), serving
    /// lazy layers from `store`, whose FUSE mount the caller puts at [`Self::layers_dir`].
    pub fn open(root: &Path, store: Arc<Store>, rt: tokio::runtime::Handle) -> Result<Self> {
        for d in [layout::snapshots_dir(root), layout::layers_dir(root)] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let s = Snapshotter {
            state: State::open(&root.join("state.redb"))?,
            root: root.to_path_buf(),
            store,
            rt,
            served: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            recent: Recent::default(),
        };
        // What a daemon killed between making a directory and recording it left behind.
        // (Safe before serving: containerd sends nothing until the socket is up.)
        s.cleanup()?;
        s.write_status();
        Ok(s)
    }

    pub fn layers_dir(root: &Path) -> PathBuf {
        layout::layers_dir(root)
    }

    /// An active snapshot on `parent` — or, when the labels name a layer that can be served
    /// lazily, that layer committed as the labels' target and [`Error::AlreadyExists`].
    /// Runs on a blocking thread: resolving a layer waits for the registry.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        match labels::ask(key, &labels) {
            Ask::Nothing => {}
            Ask::Unnamed(why) => self.fell_back(key, why),
            Ask::Layer(target) => {
                if self.serve_lazily(&target, parent, &labels)? {
                    return Err(Error::AlreadyExists(target.name));
                }
            }
        }
        self.create(Kind::Active, key, parent, labels)
    }

    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// Commit `target`'s layer as served from the layer store; false (logged and counted)
    /// when it cannot be, and containerd unpacks it.
    fn serve_lazily(
        &self,
        target: &labels::Target,
        parent: &str,
        labels: &HashMap<String, String>,
    ) -> Result<bool> {
        if let Some(r) = self.state.get(&target.name)? {
            // Served before (or unpacked): containerd finds it by List — on the parent it
            // asks for only (the same chain under another parent's name, as another
            // namespace has it, is unpacked instead).
            if r.kind == Kind::Committed && r.parent != parent {
                let why = format!("{} is committed on another parent", target.name);
                self.fell_back(&target.name, &why);
            }
            return Ok(r.kind == Kind::Committed && r.parent == parent);
        }
        self.check_parent(&self.state.get(parent)?, parent)?;
        if let Err(e) = self
            .rt
            .block_on(self.store.layer(&target.reference, &target.layer))
        {
            let why = format!("layer {} of {}: {e}", target.layer, target.reference);
            self.fell_back(&target.name, &why);
            return Ok(false);
        }
        let mut labels: BTreeMap<String, String> = labels.clone().into_iter().collect();
        labels.insert(labels::REMOTE.into(), "remote snapshot".into());
        let remote = Remote {
            reference: target.reference.clone(),
            layer: target.layer.clone(),
        };
        let id = self.state.next_id()?;
        let dir = layout::snapshot_dir(&self.root, id);
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                std::os::unix::fs::symlink(layout::layer_dir(&self.root, &remote), dir.join("fs"))
            })
            .map_err(io(&dir))?;
        let now = now();
        let record = Record {
            id,
            kind: Kind::Committed,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            usage: Some((0, 0)),
            remote: Some(remote),
        };
        let written = self.state.write(|tx| {
            if tx.get(&target.name)?.is_some() {
                return Ok(false);
            }
            tx.put(&target.name, &record)?;
            Ok(true)
        });
        if !matches!(written, Ok(true)) {
            // Served meanwhile by another unpack of the same layer.
            let _ = std::fs::remove_dir_all(&dir);
        }
        written?;
        self.served.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            "serving {} of {} lazily as {}",
            target.layer,
            target.reference,
            target.name
        );
        self.write_status();
        Ok(true)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "a snapshot key must not be empty".into(),
            ));
        }
        if self.state.get(key)?.is_some() {
            return Err(Error::AlreadyExists(key.into()));
        }
        self.check_parent(&self.state.get(parent)?, parent)?;
        let id = self.state.next_id()?;
        let dir = layout::snapshot_dir(&self.root, id);
        let made = std::fs::create_dir_all(dir.join("fs")).and_then(|()| match kind {
            Kind::Active => std::fs::create_dir(dir.join("work")),
            _ => Ok(()),
        });
        made.map_err(io(&dir))?;
        let now = now();
        let record = Record {
            id,
            kind,
            parent: parent.to_string(),
            labels: labels.into_iter().collect(),
            created: now,
            updated: now,
            usage: None,
            remote: None,
        };
        let written = self.state.write(|tx| {
            if tx.get(key)?.is_some() {
                return Err(Error::AlreadyExists(key.into()));
            }
            self.check_parent(&tx.get(parent)?, parent)?;
            tx.put(key, &record)
        });
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.mounts_of(&record)
    }

    /// A parent must be committed (or absent, for a base snapshot).
    fn check_parent(&self, found: &Option<Record>, parent: &str) -> Result<()> {
        match found {
            _ if parent.is_empty() => Ok(()),
            None => Err(Error::NotFound(parent.into())),
            Some(r) if r.kind != Kind::Committed => Err(Error::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            ))),
            Some(_) => Ok(()),
        }
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.get(key)?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: it has no mounts of its own"
            )));
        }
        self.mounts_of(&r)
    }

    fn mounts_of(&self, r: &Record) -> Result<Vec<Mount>> {
        let mut parents = Vec::new();
        let mut next = r.parent.clone();
        while !next.is_empty() {
            let p = self.get(&next)?;
            parents.push(layout::lower_dir(&self.root, &p));
            next = p.parent;
        }
        Ok(layout::mounts(&self.root, r, &parents))
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        let r = self.get(key)?;
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active: only active snapshots are committed"
            )));
        }
        let fs = layout::snapshot_dir(&self.root, r.id).join("fs");
        let usage = layout::usage(&fs).map_err(io(&fs))?;
        self.state.write(|tx| {
            let Some(r) = tx.get(key)? else {
                return Err(Error::NotFound(key.into()));
            };
            if tx.get(name)?.is_some() {
                return Err(Error::AlreadyExists(name.into()));
            }
            let committed = Record {
                kind: Kind::Committed,
                labels: labels.into_iter().collect(),
                updated: now(),
                usage: Some(usage),
                ..r
            };
            tx.remove(key)?;
            tx.put(name, &committed)
        })
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let removed = self.state.write(|tx| {
            let Some(r) = tx.get(key)? else {
                return Err(Error::NotFound(key.into()));
            };
            if tx.has_children(key)? {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has children: remove them first"
                )));
            }
            tx.remove(key)?;
            Ok(r)
        })?;
        // A lazy layer's directory holds only the link to it.
        let dir = layout::snapshot_dir(&self.root, removed.id);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))
    }

    pub fn stat(&self, key: &str) -> Result<Record> {
        self.get(key)
    }

    fn get(&self, key: &str) -> Result<Record> {
        self.state
            .get(key)?
            .ok_or_else(|| Error::NotFound(key.into()))
    }

    /// Change labels, the only mutable field: `labels` (or no path) replaces them all,
    /// `labels.KEY` sets one, an empty or missing value removing it.
    pub fn update(
        &self,
        key: &str,
        labels: HashMap<String, String>,
        paths: &[String],
    ) -> Result<Record> {
        self.state.write(|tx| {
            let Some(mut r) = tx.get(key)? else {
                return Err(Error::NotFound(key.into()));
            };
            if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                r.labels = labels
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
            }
            for p in paths.iter().filter(|p| *p != "labels") {
                let Some(k) = p.strip_prefix("labels.") else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {p:?} of snapshot {key:?}: only labels change"
                    )));
                };
                match labels.get(k).filter(|v| !v.is_empty()) {
                    Some(v) => r.labels.insert(k.to_string(), v.clone()),
                    None => r.labels.remove(k),
                };
            }
            r.updated = now();
            tx.put(key, &r)?;
            Ok(r)
        })
    }

    /// Snapshots matching any of `filters` (all with none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<(String, Record)>> {
        let filters: Vec<filter::Filter> =
            filters.iter().map(|f| filter::Filter::parse(f)).collect();
        let mut all = self.state.all()?;
        if !filters.is_empty() {
            all.retain(|(k, r)| filters.iter().any(|f| f.matches(k, r)));
        }
        Ok(all)
    }

    /// Bytes and inodes a snapshot adds: measured for an active one, as committed for the
    /// rest (nothing for a lazy layer: its bytes are in the cache, shared).
    pub fn usage(&self, key: &str) -> Result<(i64, i64)> {
        let r = self.get(key)?;
        match r.usage {
            // Recorded at commit; (0, 0) for a lazy layer.
            Some(usage) if r.kind == Kind::Committed => Ok(usage),
            _ => {
                let fs = layout::snapshot_dir(&self.root, r.id).join("fs");
                layout::usage(&fs).map_err(io(&fs))
            }
        }
    }

    /// Remove snapshot directories no record names (left by a crash between making a
    /// directory and recording it, or removing a record and its directory).
    pub fn cleanup(&self) -> Result<()> {
        let ids: HashSet<String> = self
            .state
            .all()?
            .iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let dir = layout::snapshots_dir(&self.root);
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            if !ids.contains(&*e.file_name().to_string_lossy()) {
                let path = e.path();
                tracing::info!("cleanup: removing {}", path.display());
                let removed = match e.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
                // One that cannot go stays for the next cleanup; the others still go.
                if let Err(err) = removed {
                    tracing::warn!("cleanup: {}: {err}", path.display());
                }
            }
        }
        Ok(())
    }

    fn fell_back(&self, name: &str, why: &str) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("containerd unpacks {name}: not served lazily: {why}");
        self.recent.push(format!("{name}: {why}"));
        self.write_status();
    }

    /// What an operator reads in `<root>/status`.
    pub fn status(&self) -> String {
        format!(
            "served lazily {}\nunpacked by containerd (fallbacks) {}\n{}",
            self.served.load(Ordering::Relaxed),
            self.fallbacks.load(Ordering::Relaxed),
            self.recent.lines("fallback"),
        )
    }

    /// Replaced whole, so a reader never sees half of it.
    fn write_status(&self) {
        let (tmp, path) = (self.root.join(".status.tmp"), self.root.join("status"));
        let written =
            std::fs::write(&tmp, self.status()).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: path.display().to_string(),
        source,
    }
}
