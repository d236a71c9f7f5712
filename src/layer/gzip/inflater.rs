//! A raw-deflate inflater on libz-rs-sys's zlib API: every `unsafe` call of the gzip reader
//! is here, each with the invariant it relies on. Resumable from a checkpoint (`prime`) and
//! able to inflate into a vector's spare capacity without zeroing it first.

use libz_rs_sys as z;

use super::err;

/// A raw-deflate inflater. Boxed: zlib's state points back at its stream, which must not move.
pub(super) struct Inflater {
    strm: Box<z::z_stream>,
}

impl Inflater {
    pub(super) fn raw() -> std::io::Result<Inflater> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised stream (zalloc/zfree set by Default),
        // the version string is zlib's own and the size is that of the struct we pass.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                -15,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if rc != z::Z_OK {
            return Err(err(format!("cannot start an inflater ({rc})")));
        }
        Ok(Inflater { strm })
    }

    pub(super) fn reset(&mut self) -> std::io::Result<()> {
        // SAFETY: the stream was initialised in `raw` and is still alive.
        match unsafe { z::inflateReset(&mut *self.strm) } {
            z::Z_OK => Ok(()),
            rc => Err(err(format!("inflateReset failed ({rc})"))),
        }
    }

    /// Resume at a checkpoint: feed it the partial byte's bits and the window.
    pub(super) fn prime(&mut self, bits: u8, byte: u8, window: &[u8]) -> std::io::Result<()> {
        // SAFETY: initialised stream; `window` is a live slice of the given length.
        unsafe {
            if bits > 0 {
                let rc = z::inflatePrime(&mut *self.strm, bits as i32, (byte >> (8 - bits)) as i32);
                if rc != z::Z_OK {
                    return Err(err(format!("inflatePrime failed ({rc})")));
                }
            }
            if !window.is_empty() {
                let rc =
                    z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32);
                if rc != z::Z_OK {
                    return Err(err(format!("inflateSetDictionary failed ({rc})")));
                }
            }
        }
        Ok(())
    }

    /// Inflate from `input` into `output`; returns (consumed, produced, return code).
    pub(super) fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: i32,
    ) -> (usize, usize, i32) {
        // SAFETY: `output` is a live slice of `output.len()` writable bytes.
        unsafe { self.inflate_raw(input, output.as_mut_ptr(), output.len(), flush) }
    }

    /// [`Inflater::inflate`] of at most `max` bytes into `out`'s spare capacity (which must
    /// not be empty), growing its length by what was produced: no zeroing of memory that is
    /// about to be written.
    pub(super) fn inflate_into(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> (usize, usize, i32) {
        let room = (out.capacity() - out.len()).min(max);
        // SAFETY: `out.len()` is within the allocation and `room` bytes after it are spare
        // capacity; zlib writes there through a raw pointer (no reference to uninitialised
        // bytes exists), and initialises exactly the `produced` bytes `set_len` then covers.
        unsafe {
            let dest = out.as_mut_ptr().add(out.len());
            let r = self.inflate_raw(input, dest, room, z::Z_NO_FLUSH);
            out.set_len(out.len() + r.1);
            r
        }
    }

    /// One `inflate` call from `input` into `len` bytes at `dest`.
    ///
    /// # Safety
    /// `dest` must be valid for writes of `len` bytes.
    unsafe fn inflate_raw(
        &mut self,
        input: &[u8],
        dest: *mut u8,
        len: usize,
        flush: i32,
    ) -> (usize, usize, i32) {
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = dest;
        s.avail_out = len.min(u32::MAX as usize) as u32;
        let (ai, ao) = (s.avail_in, s.avail_out);
        // SAFETY: next_in points into a live slice, next_out is writable for `len` bytes (the
        // caller's promise), and avail_in/avail_out bound them.
        let rc = unsafe { z::inflate(s, flush) };
        let s = &mut *self.strm;
        let consumed = (ai - s.avail_in) as usize;
        let produced = (ao - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        (consumed, produced, rc)
    }

    /// zlib's `data_type` after the last call: bit 7 set at a block end, bit 6 in the last
    /// block, low 3 bits the unused bits of the last input byte.
    pub(super) fn data_type(&self) -> i32 {
        self.strm.data_type
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised in `raw`, ended exactly once here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}
