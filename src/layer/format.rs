//! What every layer format offers for random access, as two traits, so that a new format is
//! one new implementation and callers (`obtain`, `view`) never match on formats.
//!
//! - [`Seekable`]: stream formats, indexed by decompressing the blob once and recording a
//!   seek point per span (gzip with zran and stored blocks, zstd frames, plain tar). A read
//!   decompresses from the nearest seek point.
//! - [`TocFormat`]: formats that carry their own index (eStargz, zstd:chunked), found
//!   from the layer's annotations and the blob's tail; each file's data is a list of chunks
//!   fetched and decoded one by one.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek};
use std::ops::Range;

use crate::digest::Digest;
use crate::error::Result;
use crate::index::seek_points::Checkpoint;
use crate::index::{self, LayerIndex, SeekPoints};
use crate::manifest::Compression;

/// A blob (or the span of it that holds the bytes wanted) that can be read from any offset.
pub trait Blob: BufRead + Seek {}
impl<T: BufRead + Seek> Blob for T {}

/// A stream format read at random from the seek points recorded while it was indexed.
pub trait Seekable: Send + Sync {
    /// Index the tar `blob` decompresses to, recording seek points (about every `span`
    /// uncompressed bytes) and span digests.
    fn index(
        &self,
        blob: Box<dyn BufRead + Send>,
        limits: index::Limits,
        span: u64,
    ) -> Result<LayerIndex>;

    /// `len` uncompressed bytes from `start`, decompressed from the last checkpoint at or
    /// before it, into `out` (emptied first; its capacity is used). Fewer come back only at
    /// the end of the stream.
    fn read_at(
        &self,
        blob: &mut dyn Blob,
        checkpoints: &[Checkpoint],
        start: u64,
        len: usize,
        out: Vec<u8>,
    ) -> std::io::Result<Vec<u8>>;
}

/// The implementation for a layer's compression.
pub fn seekable(compression: Compression) -> &'static dyn Seekable {
    match compression {
        Compression::Gzip => &super::gzip::Gzip,
        Compression::Zstd => &super::zstd::Zstd,
        Compression::None => &super::span::Plain,
    }
}

/// Index a layer blob read from `blob`: entries, and seek points about every `span`
/// uncompressed bytes, with span digests.
pub fn build_index(
    blob: impl Read + Send + 'static,
    compression: Compression,
    limits: index::Limits,
    span: u64,
) -> Result<LayerIndex> {
    let buffered =
        std::io::BufReader::with_capacity(256 << 10, super::NotEmpty::new(blob, compression));
    seekable(compression).index(Box::new(buffered), limits, span)
}

/// Index the tar an indexing reader produces, then take its seek points: what each
/// [`Seekable::index`] does with its own reader.
pub(super) fn indexed<R: Read>(
    mut r: R,
    seek_points: impl FnOnce(R) -> SeekPoints,
    limits: index::Limits,
) -> Result<LayerIndex> {
    let mut idx = index::build(&mut r, limits, |_, _, _| Ok(()))?;
    idx.seek = Some(seek_points(r));
    Ok(idx)
}

/// One chunk of a file in a TOC format: fetch compressed bytes `[offset, end)`, decode, and
/// the first `size` bytes are the file's bytes from `file_offset`, with sha256 `digest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub end: u64,
    pub file_offset: u64,
    pub size: u64,
    pub digest: Digest,
    /// A run of zeros (a hole): made here, never fetched.
    pub zeros: bool,
}

/// A layer as its TOC describes it.
#[derive(Debug, Default)]
pub struct TocLayer {
    /// Entries as a tar index would have them (without the format's own files); data
    /// offsets are meaningless here: file data is in `chunks`.
    pub index: LayerIndex,
    /// The chunks of each entry, by entry position (empty for all but non-empty files).
    pub chunks: Vec<Vec<Chunk>>,
    /// Entries the image's builder wants read first.
    pub prefetch: Vec<usize>,
}

/// A format whose blob carries its own table of contents.
pub trait TocFormat: Send + Sync {
    /// What to call it in messages ("eStargz").
    fn name(&self) -> &'static str;

    /// The digest of the TOC a layer's annotations vouch for: None when the layer is not in
    /// this format, an error when its annotation is unreadable.
    fn toc_digest(
        &self,
        compression: Compression,
        annotations: &BTreeMap<String, String>,
    ) -> Option<Result<Digest>>;

    /// How many bytes at the blob's end to read to find the TOC (0: the annotations say).
    fn footer_len(&self) -> u64;

    /// Where the TOC is in a blob of `size` bytes, from its `footer` and `annotations`.
    fn toc_range(
        &self,
        footer: &[u8],
        annotations: &BTreeMap<String, String>,
        size: u64,
    ) -> Result<Range<u64>>;

    /// What the TOC digest covers, out of the blob's `[toc_range)` (kept in the chunk store
    /// under that digest).
    fn covered(&self, stored: &[u8]) -> Result<Vec<u8>>;

    /// The TOC's JSON from what its digest covers.
    fn json(&self, covered: &[u8]) -> Result<Vec<u8>>;

    /// The verified TOC as an index and chunk tables; `toc_offset` ends the last chunk.
    fn parse(&self, toc: &[u8], toc_offset: u64) -> Result<TocLayer>;

    /// One chunk's bytes from its fetched compressed bytes, verified against its digest.
    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>>;
}

/// Every TOC format imgfs reads.
const TOC_FORMATS: [&dyn TocFormat; 2] =
    [&super::estargz::Estargz, &super::zstd_chunked::ZstdChunked];

/// The TOC format a layer announces (and its TOC digest), if any.
pub fn toc_format(
    compression: Compression,
    annotations: &BTreeMap<String, String>,
) -> Option<(&'static dyn TocFormat, Result<Digest>)> {
    TOC_FORMATS
        .iter()
        .find_map(|f| f.toc_digest(compression, annotations).map(|d| (*f, d)))
}
