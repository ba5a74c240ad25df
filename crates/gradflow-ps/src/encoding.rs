//! The value encodings of the wire (`[transport] compression`), as both adapters decode them:
//! a push's compact values are widened to f32 once, where they arrive, and a pull's values
//! narrowed once, where they leave. The core sees only f32.

use bytes::Bytes;
use gradflow_proto::codec;
use gradflow_proto::pb::ValueEncoding;

use crate::PsError;

/// The encoding a request names; an unknown one is refused.
pub fn encoding_of(value: i32) -> Result<ValueEncoding, PsError> {
    ValueEncoding::try_from(value).map_err(|_| {
        PsError::InvalidArgument(format!(
            "unknown value encoding {value}; expected 0 (f32), 1 (f16) or 2 (bf16)"
        ))
    })
}

/// The values of `tensor` in `bytes` (of `encoding`) as f32 little-endian bytes; `bytes`
/// itself when it is f32 already. A length that is not whole values is refused.
pub fn widen(bytes: Bytes, encoding: ValueEncoding, tensor: &str) -> Result<Bytes, PsError> {
    if codec::value_len(&bytes, encoding).is_none() {
        return Err(PsError::InvalidArgument(format!(
            "{} bytes of values for `{tensor}` is not a whole number of {} values",
            bytes.len(),
            codec::encoding_name(encoding)
        )));
    }
    Ok(codec::widen(bytes, encoding))
}
