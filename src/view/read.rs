//! Reads: a file's bytes from its layer — a local blob, the piece cache, spans fetched by
//! range, chunks of TOC layers (eStargz, zstd:chunked); sparse files' holes as zeros.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::pieces::piece_at;
use super::{ImageView, LayerData, Reader};
use crate::bufpool;
use crate::error::{Error, Result};
use crate::manifest::Compression;
use crate::obtain::TocFiles;
use crate::tree::InodeId;

impl ImageView {
    /// Read up to `len` bytes at `offset` of regular file `inode`. Short only at its end.
    pub fn read(&self, inode: InodeId, offset: u64, len: usize) -> Result<Bytes> {
        self.read_inner(inode, offset, len, false)
    }

    /// [`ImageView::read`] for a range that will not be read again (a small file `cat`
    /// prints whole): decompresses no further than its end, and caches nothing.
    pub fn read_once(&self, inode: InodeId, offset: u64, len: usize) -> Result<Bytes> {
        self.read_inner(inode, offset, len, true)
    }

    fn read_inner(&self, inode: InodeId, offset: u64, len: usize, exact: bool) -> Result<Bytes> {
        let Some(data) = self.tree.inodes[inode as usize].data else {
            return Err(Error::malformed("read", "not a regular file"));
        };
        let layer = &self.layers[data.layer as usize];
        self.reader
            .read_file(layer, data.entry as usize, offset, len, exact)
    }
}

impl Reader {
    /// Read up to `len` bytes at `offset` of file `entry` (its position in the layer's
    /// index) of `layer`. Short only at the file's end. `exact`: the range will not be read
    /// again (see [`ImageView::read_once`]).
    pub fn read_file(
        &self,
        layer: &Arc<LayerData>,
        entry: usize,
        offset: u64,
        len: usize,
        exact: bool,
    ) -> Result<Bytes> {
        let entry_index = entry;
        let entry = &layer.index.entries[entry_index];
        if offset >= entry.size {
            return Ok(Bytes::new());
        }
        let len = len.min((entry.size - offset) as usize);
        if let Some(sg) = &layer.toc {
            return self
                .read_toc(layer, sg, entry_index, offset, len)
                .map(Bytes::from)
                .map_err(|e| Error::Io {
                    context: format!("reading {} from layer {}", entry.path, layer.digest),
                    cause: e,
                });
        }
        let fail = |e: std::io::Error| Error::Io {
            context: format!("reading {:?} from layer {}", entry.path, layer.digest),
            cause: e,
        };
        let file_end = entry.offset + entry.stored_len();
        if entry.sparse.is_empty() {
            return self
                .read_stored_data(layer, entry.offset + offset, len, file_end, exact)
                .map_err(fail);
        }
        // A sparse file: its regions' bytes are stored one after another; holes are zeros.
        let end = offset + len as u64;
        let mut out = Vec::with_capacity(len);
        let mut stored_before = 0u64;
        for r in &entry.sparse {
            let r_end = r.offset + r.len;
            if r_end > offset && r.offset < end && r.len > 0 {
                let from = r.offset.max(offset);
                out.resize((from - offset) as usize, 0);
                let take = (r_end.min(end) - from) as usize;
                let at = entry.offset + stored_before + (from - r.offset);
                let bytes = self
                    .read_stored_data(layer, at, take, file_end, exact)
                    .map_err(fail)?;
                out.extend_from_slice(&bytes);
            }
            stored_before += r.len;
        }
        out.resize(len, 0);
        Ok(out.into())
    }

    /// `len` bytes of a layer's uncompressed stream at `start`, for a file whose stored data
    /// ends at `file_end`: from the local blob where there is one, else by span.
    pub(super) fn read_stored_data(
        &self,
        layer: &Arc<LayerData>,
        start: u64,
        len: usize,
        file_end: u64,
        exact: bool,
    ) -> std::io::Result<Bytes> {
        if let Some(rec) = &self.recorder {
            record_spans(rec, layer, start, len);
        }
        if layer.compression == Compression::None
            && let Some(f) = layer.local.get()
        {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, start)?;
            return Ok(buf.into());
        }
        if layer.compression == Compression::Gzip
            && let Some(f) = layer.local.get()
            && let Some(bytes) = layer.read_stored(f, start, len)?
        {
            return Ok(bytes.into());
        }
        self.read_spans(layer, start, len, file_end, exact)
    }

    /// Read `len` bytes at `offset` of TOC-layer file `entry`, chunk by chunk.
    pub(super) fn read_toc(
        &self,
        layer: &LayerData,
        sg: &TocFiles,
        entry: usize,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        let chunks = &sg.chunks[entry];
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while out.len() < len {
            let c = chunks
                .partition_point(|c| c.file_offset <= pos)
                .checked_sub(1)
                .map(|i| &chunks[i])
                .ok_or_else(|| std::io::Error::other("no chunk holds this offset"))?;
            if let Some(rec) = &self.recorder
                && !c.zeros
            {
                rec.record(&layer.descriptor.digest, c.offset);
            }
            let piece = self.piece((layer.id, c.offset), || self.fetcher.toc_chunk(layer, c))?;
            let at = (pos - c.file_offset) as usize;
            if at >= piece.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file's chunks end before the file does",
                ));
            }
            let take = (len - out.len()).min(piece.len() - at);
            out.extend_from_slice(&piece[at..at + take]);
            pos += take as u64;
        }
        Ok(out)
    }

    pub(super) fn read_spans(
        &self,
        layer: &Arc<LayerData>,
        start: u64,
        len: usize,
        file_end: u64,
        exact: bool,
    ) -> std::io::Result<Bytes> {
        let sp = layer.seek()?;
        // Filled only by a read that crosses pieces; one inside a piece is a slice of it.
        let mut out = Vec::new();
        let mut pos = start;
        while pos < start + len as u64 {
            let (k, piece_start, piece_len) = piece_at(sp, layer.data_end, pos)?;
            // A read that will not come again (`read_once`) decompresses only up to its end
            // and keeps nothing; others decompress and keep the whole piece.
            let piece = if exact {
                let want = (start + len as u64 - piece_start).min(piece_len as u64) as usize;
                bufpool::freeze(self.make_piece(layer, k, piece_start, want, file_end)?)
            } else {
                self.piece((layer.id, piece_start), || {
                    self.make_piece(layer, k, piece_start, piece_len, file_end)
                })?
            };
            let at = (pos - piece_start) as usize;
            if at >= piece.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "layer ends before the file does",
                ));
            }
            let take = ((start + len as u64 - pos) as usize).min(piece.len() - at);
            if pos == start && take == len {
                return Ok(piece.slice(at..at + take));
            }
            out.extend_from_slice(&piece[at..at + take]);
            pos += take as u64;
        }
        Ok(out.into())
    }
}

/// Record, for an access profile, each span that uncompressed bytes `[start, start + len)`
/// of `layer` come from, by the compressed offset of its seek point.
fn record_spans(rec: &crate::profile::Recorder, layer: &LayerData, start: u64, len: usize) {
    let Ok(sp) = layer.seek() else { return };
    let (Some(first), Some(last)) = (
        sp.span_at(start),
        sp.span_at(start + (len as u64).saturating_sub(1)),
    ) else {
        return;
    };
    for k in first..=last {
        rec.record(&layer.descriptor.digest, sp.checkpoints[k].in_offset);
    }
}
