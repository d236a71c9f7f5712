//! The snapshotter's records in an embedded database (redb, `<root>/state.redb`): one record
//! per snapshot key, written in one transaction per change and committed before containerd
//! hears the answer. redb commits by flipping a checksummed slot, so a process killed at any
//! moment leaves the last committed state, which loads; its file lock keeps a second daemon
//! off the same root.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Error;

/// Snapshot key → postcard-encoded [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters: `next id`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// A layer served lazily: the image reference and layer digest it was resolved from, which
/// name its directory in the layer store and let a restarted daemon serve it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub reference: String,
    pub layer: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Names `<root>/snapshots/<id>` (ordinary snapshots) and is never reused.
    pub id: u64,
    pub kind: Kind,
    /// The parent's key, empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Unix time in nanoseconds.
    pub created: i64,
    pub updated: i64,
    /// Bytes and inodes, measured at commit.
    pub usage: Option<(i64, i64)>,
    pub remote: Option<Remote>,
}

pub struct State {
    db: Database,
}

/// One write transaction's view of the records.
pub struct Tx<'a> {
    snapshots: redb::Table<'a, &'static str, &'static [u8]>,
}

impl State {
    pub fn open(path: &Path) -> Result<State, Error> {
        let db = Database::create(path).map_err(|e| state_err(path, e))?;
        let state = State { db };
        // Create the tables, so that readers never meet a missing one.
        state.write(|_| Ok(()))?;
        Ok(state)
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        let value = table.get(key).map_err(db_err)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    /// Every record, by key.
    pub fn all(&self) -> Result<Vec<(String, Record)>, Error> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// A new snapshot id, committed at once so that it is never handed out twice.
    pub fn next_id(&self) -> Result<u64, Error> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let id = meta
                .get("next id")
                .map_err(db_err)?
                .map_or(1, |v| v.value());
            meta.insert("next id", id + 1).map_err(db_err)?;
            id
        };
        txn.commit().map_err(db_err)?;
        Ok(id)
    }

    /// Run `f` in one write transaction, committed only if it succeeds.
    pub fn write<R>(&self, f: impl FnOnce(&mut Tx) -> Result<R, Error>) -> Result<R, Error> {
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        let r = {
            let mut tx = Tx {
                snapshots: txn.open_table(SNAPSHOTS).map_err(db_err)?,
            };
            f(&mut tx)?
        };
        txn.commit().map_err(db_err)?;
        Ok(r)
    }
}

impl Tx<'_> {
    pub fn get(&self, key: &str) -> Result<Option<Record>, Error> {
        let value = self.snapshots.get(key).map_err(db_err)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    pub fn put(&mut self, key: &str, record: &Record) -> Result<(), Error> {
        let bytes = postcard::to_allocvec(record).map_err(|e| Error::State(e.to_string()))?;
        self.snapshots
            .insert(key, bytes.as_slice())
            .map_err(db_err)?;
        Ok(())
    }

    pub fn remove(&mut self, key: &str) -> Result<(), Error> {
        self.snapshots.remove(key).map_err(db_err)?;
        Ok(())
    }

    /// Whether any snapshot names `key` as its parent.
    pub fn has_children(&self, key: &str) -> Result<bool, Error> {
        for item in self.snapshots.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            if decode(k.value(), v.value())?.parent == key {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, Error> {
    postcard::from_bytes(bytes).map_err(|e| Error::State(format!("record of {key:?}: {e}")))
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    Error::State(e.into().to_string())
}

fn state_err(path: &Path, e: impl Into<redb::Error>) -> Error {
    Error::State(format!("{}: {}", path.display(), e.into()))
}
