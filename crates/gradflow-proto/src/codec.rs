//! Little-endian byte codecs for tensor data.
//!
//! On little-endian hosts (every platform gradflow runs on in practice) the `f32` codecs are
//! plain memory copies; the per-element paths exist so big-endian hosts stay correct. The
//! `*_values` codecs take a [`ValueEncoding`]: f32, or the 16-bit f16 and bf16 of
//! `[transport] compression`, which a sender narrows to and a receiver widens from once, at
//! the edge (servers keep and compute in f32).

use bytes::{Bytes, BytesMut};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::pb::ValueEncoding;

/// Bytes of `values` as little-endian `f32`. One copy: the caller keeps its buffer.
pub fn f32s_to_bytes(values: &[f32]) -> Bytes {
    if cfg!(target_endian = "little") {
        Bytes::copy_from_slice(bytemuck::cast_slice(values))
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }
}

/// Bytes of `ids` as little-endian `u64`.
pub fn u64s_to_bytes(ids: &[u64]) -> Bytes {
    if cfg!(target_endian = "little") {
        Bytes::copy_from_slice(bytemuck::cast_slice(ids))
    } else {
        ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }
}

/// Appends `values` as little-endian `f32` to `out`.
pub fn extend_f32s(out: &mut Vec<u8>, values: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
}

/// Puts `values` as little-endian `f32` into `buf`, replacing what it held and reusing its
/// allocation when that is large enough.
pub fn put_f32s(buf: &mut bytes::BytesMut, values: &[f32]) {
    buf.clear();
    if cfg!(target_endian = "little") {
        buf.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        buf.reserve(values.len() * 4);
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Writes `src` as little-endian `f32` into `dst`. Panics if `dst.len() != 4 * src.len()`.
pub fn write_f32s(dst: &mut [u8], src: &[f32]) {
    assert_eq!(dst.len(), src.len() * 4, "f32 byte length");
    if cfg!(target_endian = "little") {
        dst.copy_from_slice(bytemuck::cast_slice(src));
    } else {
        for (d, v) in dst.chunks_exact_mut(4).zip(src) {
            d.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Number of `f32` values in `bytes`, or `None` when the length is not a multiple of 4.
pub fn f32_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() % 4 == 0).then_some(bytes.len() / 4)
}

/// Number of `u64` values in `bytes`, or `None` when the length is not a multiple of 8.
pub fn u64_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() % 8 == 0).then_some(bytes.len() / 8)
}

/// Copies little-endian `f32` bytes into `dst`. Panics if `src.len() != 4 * dst.len()`.
pub fn copy_f32s(dst: &mut [f32], src: &[u8]) {
    assert_eq!(src.len(), dst.len() * 4, "f32 byte length");
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(src);
    } else {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes(s.try_into().unwrap());
        }
    }
}

/// Adds little-endian `f32` bytes into `dst` element-wise. Panics on a length mismatch.
pub fn add_f32s(dst: &mut [f32], src: &[u8]) {
    assert_eq!(src.len(), dst.len() * 4, "f32 byte length");
    match bytemuck::try_cast_slice::<u8, f32>(src) {
        Ok(vals) if cfg!(target_endian = "little") => {
            for (d, s) in dst.iter_mut().zip(vals) {
                *d += *s;
            }
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d += f32::from_le_bytes(s.try_into().unwrap());
            }
        }
    }
}

/// Reads the `i`-th little-endian `f32` of `bytes`.
pub fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap())
}

/// Iterates the little-endian `u64` values of `bytes` (a trailing partial value is ignored).
pub fn u64s(bytes: &[u8]) -> impl ExactSizeIterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()))
}

/// Decodes little-endian `u64` bytes into `out` (cleared first).
pub fn read_u64s(bytes: &[u8], out: &mut Vec<u64>) {
    out.clear();
    out.extend(u64s(bytes));
}

/// True when every little-endian `f32` in `bytes` is finite.
pub fn all_finite(bytes: &[u8]) -> bool {
    match bytemuck::try_cast_slice::<u8, f32>(bytes) {
        // Blocks without an early exit inside, so that the compiler vectorizes the check.
        Ok(vals) if cfg!(target_endian = "little") => vals.chunks(1024).all(|block| {
            block.iter().fold(0u32, |bad, v| bad | u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000)) == 0
        }),
        _ => bytes.chunks_exact(4).all(|s| f32::from_le_bytes(s.try_into().unwrap()).is_finite()),
    }
}

/// The name of `encoding` as the job file writes it (`f32` for none).
pub fn encoding_name(encoding: ValueEncoding) -> &'static str {
    match encoding {
        ValueEncoding::F32 => "f32",
        ValueEncoding::F16 => "f16",
        ValueEncoding::Bf16 => "bf16",
    }
}

/// Bytes per value in `encoding`.
pub fn value_bytes(encoding: ValueEncoding) -> usize {
    match encoding {
        ValueEncoding::F32 => 4,
        ValueEncoding::F16 | ValueEncoding::Bf16 => 2,
    }
}

/// Number of values in `bytes` of `encoding`, or `None` when the length is not a multiple of
/// the value size.
pub fn value_len(bytes: &[u8], encoding: ValueEncoding) -> Option<usize> {
    let size = value_bytes(encoding);
    (bytes.len() % size == 0).then_some(bytes.len() / size)
}

/// Values converted per block: small enough for the stack, large enough for the vector units.
const BLOCK: usize = 64;

/// bfloat16 bits of `v`, rounded to nearest even as `half::bf16::from_f32` does (NaN stays a
/// quiet NaN); branch-free for finite values, so that a loop of it vectorizes.
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        return (x >> 16) as u16 | 0x0040;
    }
    (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// Writes `src` in a compact `encoding` into `dst`, 2 little-endian bytes per value. A finite
/// value beyond f16's range is sent as f16's largest value of its sign (so that a large but
/// finite gradient is not refused as infinite); NaN and infinities stay what they are.
fn narrow_into(dst: &mut [u8], src: &[f32], encoding: ValueEncoding) {
    debug_assert_eq!(dst.len(), src.len() * 2);
    let mut bits = [0u16; BLOCK];
    for (d, s) in dst.chunks_mut(2 * BLOCK).zip(src.chunks(BLOCK)) {
        let bits = &mut bits[..s.len()];
        if encoding == ValueEncoding::F16 {
            let mut clamped = [0f32; BLOCK];
            for (c, &v) in clamped.iter_mut().zip(s) {
                *c = if v.abs() <= f32::MAX { v.clamp(-65504.0, 65504.0) } else { v };
            }
            // f16 conversion in hardware where the processor has it (F16C), per block.
            bits.as_mut().reinterpret_cast_mut::<f16>().convert_from_f32_slice(&clamped[..s.len()]);
        } else {
            for (b, &v) in bits.iter_mut().zip(s) {
                *b = bf16_bits(v);
            }
        }
        for (pair, b) in d.chunks_exact_mut(2).zip(bits.iter()) {
            pair.copy_from_slice(&b.to_le_bytes());
        }
    }
}

/// Reads `src`, 2 little-endian bytes per value of a compact `encoding`, into `dst`.
fn widen_into(dst: &mut [f32], src: &[u8], encoding: ValueEncoding) {
    debug_assert_eq!(src.len(), dst.len() * 2);
    let mut bits = [0u16; BLOCK];
    for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(2 * BLOCK)) {
        let bits = &mut bits[..d.len()];
        for (b, pair) in bits.iter_mut().zip(s.chunks_exact(2)) {
            *b = u16::from_le_bytes([pair[0], pair[1]]);
        }
        if encoding == ValueEncoding::F16 {
            bits.as_ref().reinterpret_cast::<f16>().convert_to_f32_slice(d);
        } else {
            for (v, &b) in d.iter_mut().zip(bits.iter()) {
                *v = f32::from_bits(u32::from(b) << 16);
            }
        }
    }
}

/// Appends `values` in `encoding` to `out`.
pub fn extend_values(out: &mut Vec<u8>, values: &[f32], encoding: ValueEncoding) {
    match encoding {
        ValueEncoding::F32 => extend_f32s(out, values),
        _ => {
            let at = out.len();
            out.resize(at + values.len() * 2, 0);
            narrow_into(&mut out[at..], values, encoding);
        }
    }
}

/// Puts `values` in `encoding` into `buf`, replacing what it held and reusing its allocation
/// when that is large enough.
pub fn put_values(buf: &mut BytesMut, values: &[f32], encoding: ValueEncoding) {
    match encoding {
        ValueEncoding::F32 => put_f32s(buf, values),
        _ => {
            buf.clear();
            buf.resize(values.len() * 2, 0);
            narrow_into(&mut buf[..], values, encoding);
        }
    }
}

/// Decodes `src`, values in `encoding`, into `dst`. Panics if `src` does not hold exactly
/// `dst.len()` values.
pub fn copy_values(dst: &mut [f32], src: &[u8], encoding: ValueEncoding) {
    match encoding {
        ValueEncoding::F32 => copy_f32s(dst, src),
        _ => {
            assert_eq!(src.len(), dst.len() * 2, "16-bit value byte length");
            widen_into(dst, src, encoding);
        }
    }
}

/// `src`, values in `encoding`, as f32 little-endian bytes: `src` itself when it is f32
/// already, else one new buffer.
pub fn widen(src: Bytes, encoding: ValueEncoding) -> Bytes {
    if encoding == ValueEncoding::F32 {
        return src;
    }
    let n = src.len() / 2;
    let mut values = vec![0f32; n];
    widen_into(&mut values, &src[..n * 2], encoding);
    if cfg!(target_endian = "little") {
        // The values' own allocation becomes the buffer: no second copy.
        Bytes::from_owner(F32Bytes(values))
    } else {
        f32s_to_bytes(&values)
    }
}

/// A `Vec<f32>` seen as its little-endian bytes (little-endian hosts only).
struct F32Bytes(Vec<f32>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// `src`, f32 little-endian bytes, in `encoding`: `src` itself for f32, else one new buffer.
pub fn narrow(src: Bytes, encoding: ValueEncoding) -> Bytes {
    if encoding == ValueEncoding::F32 {
        return src;
    }
    let n = src.len() / 4;
    let mut out = vec![0u8; n * 2];
    match bytemuck::try_cast_slice::<u8, f32>(&src[..n * 4]) {
        Ok(values) if cfg!(target_endian = "little") => narrow_into(&mut out, values, encoding),
        _ => {
            let mut values = vec![0f32; n];
            copy_f32s(&mut values, &src[..n * 4]);
            narrow_into(&mut out, &values, encoding);
        }
    }
    out.into()
}

/// True when every value in `bytes` (of `encoding`) is finite.
pub fn all_finite_values(bytes: &[u8], encoding: ValueEncoding) -> bool {
    // An f16's exponent is bits 10..15, a bf16's bits 7..15; all ones is infinite or NaN.
    let exponent: u16 = match encoding {
        ValueEncoding::F32 => return all_finite(bytes),
        ValueEncoding::F16 => 0x7c00,
        ValueEncoding::Bf16 => 0x7f80,
    };
    bytes.chunks_exact(2).all(|s| u16::from_le_bytes([s[0], s[1]]) & exponent != exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip() {
        let v = [1.5f32, -2.25, 0.0, f32::MAX];
        let b = f32s_to_bytes(&v);
        assert_eq!(b.len(), 16);
        let mut out = [0f32; 4];
        copy_f32s(&mut out, &b);
        assert_eq!(out, v);
        assert_eq!(f32_at(&b, 1), -2.25);
    }

    #[test]
    fn put_replaces_and_reuses() {
        let mut buf = bytes::BytesMut::new();
        put_f32s(&mut buf, &[1.0, 2.0, 3.0]);
        let ptr = buf.as_ptr();
        put_f32s(&mut buf, &[4.0, 5.0]);
        assert_eq!(&buf[..], &f32s_to_bytes(&[4.0, 5.0])[..]);
        assert_eq!(buf.as_ptr(), ptr, "same allocation");
    }

    #[test]
    fn add_works_on_unaligned_bytes() {
        let mut raw = vec![0u8];
        extend_f32s(&mut raw, &[1.0, 2.0]);
        let mut dst = [10.0f32, 20.0];
        add_f32s(&mut dst, &raw[1..]);
        assert_eq!(dst, [11.0, 22.0]);
    }

    #[test]
    fn u64_round_trip_and_lengths() {
        let ids = [0u64, 7, u64::MAX];
        let b = u64s_to_bytes(&ids);
        assert_eq!(u64s(&b).collect::<Vec<_>>(), ids);
        assert_eq!(u64_len(&b), Some(3));
        assert_eq!(u64_len(&b[1..]), None);
        assert_eq!(f32_len(&[0u8; 6]), None);
    }

    #[test]
    fn finiteness() {
        assert!(all_finite(&f32s_to_bytes(&[1.0, 2.0])));
        assert!(!all_finite(&f32s_to_bytes(&[1.0, f32::NAN])));
        assert!(!all_finite(&f32s_to_bytes(&[f32::INFINITY])));
        // Anywhere in a long slice, in any block, of either sign.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1023, 1024, 2500, 4095] {
                let mut v = vec![0.5f32; 4096];
                v[at] = bad;
                assert!(!all_finite(&f32s_to_bytes(&v)), "{bad} at {at}");
            }
        }
        assert!(all_finite(&f32s_to_bytes(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE, -0.0, 1e-45])));
    }

    #[test]
    fn compact_encodings_round_trip_within_their_precision() {
        let v = [1.0f32, -0.333_333, 1e-3, 123.456, 0.0, -0.0];
        for (encoding, rel) in [(ValueEncoding::F16, 1.0 / 2048.0), (ValueEncoding::Bf16, 1.0 / 256.0)] {
            let mut buf = BytesMut::new();
            put_values(&mut buf, &v, encoding);
            assert_eq!(buf.len(), v.len() * 2, "{encoding:?}: 2 bytes per value");
            assert_eq!(value_len(&buf, encoding), Some(v.len()));
            let mut back = [9f32; 6];
            copy_values(&mut back, &buf, encoding);
            for (x, y) in back.iter().zip(&v) {
                assert!((x - y).abs() <= rel * y.abs(), "{encoding:?}: {y} came back as {x}");
            }
            // The other paths give the same bits.
            let mut ext = Vec::new();
            extend_values(&mut ext, &v, encoding);
            assert_eq!(&ext[..], &buf[..]);
            assert_eq!(narrow(f32s_to_bytes(&v), encoding), buf.clone().freeze());
            assert_eq!(widen(buf.freeze(), encoding), f32s_to_bytes(&back));
        }
        // f32 is the identity, without a copy.
        let b = f32s_to_bytes(&v);
        assert_eq!(widen(b.clone(), ValueEncoding::F32).as_ptr(), b.as_ptr());
        assert_eq!(narrow(b.clone(), ValueEncoding::F32).as_ptr(), b.as_ptr());
    }

    #[test]
    fn block_conversions_give_the_bits_of_halfs_own_scalar_ones() {
        // Every exponent, both signs, mantissas that round up, down and to even, odd lengths.
        let mut values: Vec<f32> =
            (0..20_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))).collect();
        values.extend([0.0, -0.0, 1.0 + f32::EPSILON, 65504.0, 65519.0, 1e-8, f32::MIN_POSITIVE]);
        values.retain(|v| !v.is_nan());
        for encoding in [ValueEncoding::F16, ValueEncoding::Bf16] {
            for len in [values.len(), 63, 65, 1] {
                let v = &values[..len];
                let mut got = Vec::new();
                extend_values(&mut got, v, encoding);
                for (k, (&x, pair)) in v.iter().zip(got.chunks_exact(2)).enumerate() {
                    let bits = u16::from_le_bytes([pair[0], pair[1]]);
                    let want = match encoding {
                        ValueEncoding::F16 if x.is_finite() => {
                            f16::from_f32(x.clamp(-65504.0, 65504.0)).to_bits()
                        }
                        ValueEncoding::F16 => f16::from_f32(x).to_bits(),
                        _ => half::bf16::from_f32(x).to_bits(),
                    };
                    assert_eq!(bits, want, "{encoding:?} value {k}: {x:e}");
                }
                let mut back = vec![0f32; len];
                copy_values(&mut back, &got, encoding);
                for (k, (&b, pair)) in back.iter().zip(got.chunks_exact(2)).enumerate() {
                    let bits = u16::from_le_bytes([pair[0], pair[1]]);
                    let want = match encoding {
                        ValueEncoding::F16 => f16::from_bits(bits).to_f32(),
                        _ => half::bf16::from_bits(bits).to_f32(),
                    };
                    assert_eq!(b.to_bits(), want.to_bits(), "{encoding:?} value {k}");
                }
            }
        }
    }

    #[test]
    fn f16_saturates_finite_values_and_keeps_non_finite_ones() {
        let mut buf = BytesMut::new();
        put_values(&mut buf, &[1e6, -1e9, f32::MAX], ValueEncoding::F16);
        let mut back = [0f32; 3];
        copy_values(&mut back, &buf, ValueEncoding::F16);
        assert_eq!(back, [65504.0, -65504.0, 65504.0]);
        assert!(all_finite_values(&buf, ValueEncoding::F16));
        for encoding in [ValueEncoding::F16, ValueEncoding::Bf16] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut buf = BytesMut::new();
                put_values(&mut buf, &[0.5, bad, 2.0], encoding);
                assert!(!all_finite_values(&buf, encoding), "{encoding:?} {bad}");
                let mut back = [0f32; 3];
                copy_values(&mut back, &buf, encoding);
                assert!(!back[1].is_finite() && back[0] == 0.5 && back[2] == 2.0, "{encoding:?} {bad}");
            }
            // bf16 keeps f32's range.
            let mut buf = BytesMut::new();
            put_values(&mut buf, &[3e38], ValueEncoding::Bf16);
            assert!(all_finite_values(&buf, ValueEncoding::Bf16));
        }
    }
}
