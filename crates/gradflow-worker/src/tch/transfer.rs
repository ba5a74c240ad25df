//! How values move between a tch variable and the worker's network buffers.
//!
//! The worker library reads gradients from and writes parameters into `f32` slices; every
//! copy between those slices and a variable is one of the two below.
//!
//! - [`Transfer::Direct`] (CPU variables): a pull writes the servers' values straight into the
//!   variable's memory, and a push encodes the gradient straight from the gradient's memory.
//!   The only copy is the one into (or out of) the wire message.
//! - [`Transfer::Staged`] (CUDA variables): one host buffer per tensor, allocated once and
//!   pinned (page-locked) so that the GPU copies to and from it by DMA. A pull fills the
//!   buffer and starts a non-blocking host-to-device copy, ordered on the CUDA stream before
//!   the forward pass that reads the variable; a push copies the gradient into the buffer and
//!   encodes it from there. The copies are whole-tensor copies (no per-element work on the
//!   host), and the buffer is reused every step.
//!
//! Staged also works on the CPU (the buffer is then ordinary memory): tests use it to check
//! the CUDA code path on machines without a GPU.

use ::tch::{Device, Kind, Tensor};

use super::TchError;

/// How values move between variables and the network buffers; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// Straight through the memory of CPU tensors. CPU variables only.
    Direct,
    /// Through one host buffer per tensor, pinned when the variables are on a CUDA device.
    Staged,
}

impl Transfer {
    /// The default for variables on `device`: `Direct` on the CPU, `Staged` elsewhere.
    pub fn for_device(device: Device) -> Transfer {
        if device == Device::Cpu { Transfer::Direct } else { Transfer::Staged }
    }
}

/// Checks that `t` can be read or written as a slice of `f32` in host memory.
fn check_host(t: &Tensor, name: &str) -> Result<usize, TchError> {
    let (device, kind, contiguous) = (t.device(), t.f_kind()?, t.is_contiguous());
    if device != Device::Cpu || kind != Kind::Float || !contiguous {
        return Err(TchError::Layout {
            name: name.to_string(),
            detail: format!("{kind:?} on {device:?}, contiguous: {contiguous}"),
        });
    }
    Ok(t.numel())
}

/// The values of a contiguous `f32` CPU tensor, read in place.
pub(crate) fn host_slice<'t>(t: &'t Tensor, name: &str) -> Result<&'t [f32], TchError> {
    let n = check_host(t, name)?;
    if n == 0 {
        return Ok(&[]);
    }
    // SAFETY: `t` is a contiguous CPU tensor of `n` f32 values (checked above), so its data
    // pointer is valid and aligned for `n` reads. libtorch runs CPU operations synchronously
    // on the calling thread, so nothing writes the storage while the adapter (which is not
    // `Sync`) holds this borrow, as long as the user does not run the model on another thread
    // during a push; the adapter's docs say so.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) })
}

/// The values of a contiguous `f32` CPU tensor, written in place.
pub(crate) fn host_slice_mut<'t>(t: &'t mut Tensor, name: &str) -> Result<&'t mut [f32], TchError> {
    let n = check_host(t, name)?;
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `host_slice`; in addition no Rust reference to this storage exists
    // (tch hands out no slices of tensor memory), and the writes happen before the forward
    // pass that reads them, so autograd has saved nothing that depends on the old values.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) })
}

/// A reusable host buffer of `f32` values for one tensor, pinned when it serves a CUDA device.
pub(crate) struct HostBuffer {
    /// 1-D, contiguous, `f32`, on the CPU; its length is the capacity.
    buf: Tensor,
    /// The device of the variables this buffer serves.
    device: Device,
}

impl HostBuffer {
    /// A buffer of `capacity` values for variables on `device`.
    pub fn new(capacity: usize, device: Device) -> Result<HostBuffer, TchError> {
        let buf = Tensor::f_empty([capacity.max(1) as i64], (Kind::Float, Device::Cpu))?;
        let buf = if device.is_cuda() { buf.f_pin_memory(device)? } else { buf };
        Ok(HostBuffer { buf, device })
    }

    /// Whether the buffer is page-locked memory for the device (always false for the CPU).
    pub fn is_pinned(&self) -> bool {
        self.device.is_cuda() && self.buf.is_pinned(self.device)
    }

    fn capacity(&self) -> usize {
        self.buf.numel()
    }

    /// Makes room for `n` values, keeping the buffer when it is large enough already.
    pub fn reserve(&mut self, n: usize) -> Result<(), TchError> {
        if n > self.capacity() {
            *self = HostBuffer::new(n.max(2 * self.capacity()), self.device)?;
        }
        Ok(())
    }

    /// The first `n` values.
    pub fn slice(&self, n: usize) -> Result<&[f32], TchError> {
        Ok(&host_slice(&self.buf, "host buffer")?[..n])
    }

    /// The first `n` values, to be written.
    pub fn slice_mut(&mut self, n: usize) -> Result<&mut [f32], TchError> {
        Ok(&mut host_slice_mut(&mut self.buf, "host buffer")?[..n])
    }

    /// The first values of the buffer as a CPU tensor of shape `shape` (no copy).
    fn view(&self, shape: &[i64]) -> Result<Tensor, TchError> {
        let n: i64 = shape.iter().product();
        Ok(self.buf.f_narrow(0, 0, n)?.f_view(shape)?)
    }

    /// The first values of the buffer, as a tensor of shape `shape` on the device. On CUDA the
    /// copy is non-blocking: it is queued on the current stream, before whatever reads it.
    pub fn to_device(&self, shape: &[i64]) -> Result<Tensor, TchError> {
        Ok(self.view(shape)?.f_to_device_(self.device, Kind::Float, true, false)?)
    }

    /// Copies the first values of the buffer into `dst` (same number of elements), without
    /// recording the copy for autograd.
    pub fn upload(&self, dst: &mut Tensor) -> Result<(), TchError> {
        let src = self.to_device(&dst.size())?;
        ::tch::no_grad(|| dst.f_copy_(&src))?;
        Ok(())
    }

    /// Copies `src` into the buffer (growing it if needed) and waits until the values are in
    /// host memory.
    pub fn download(&mut self, src: &Tensor) -> Result<(), TchError> {
        self.reserve(src.numel())?;
        let mut dst = self.view(&src.size())?;
        // A copy into page-locked memory; `copy_` waits for it (and for the work queued before
        // it on the stream, such as the backward pass that produced `src`).
        ::tch::no_grad(|| dst.f_copy_(src))?;
        Ok(())
    }
}

/// Waits for the work queued on `device` (a no-op on the CPU).
pub(crate) fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        ::tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_slices_read_and_write_the_tensor_memory() {
        let mut t = Tensor::from_slice(&[1f32, 2.0, 3.0]);
        host_slice_mut(&mut t, "t").unwrap()[1] = 7.0;
        assert_eq!(host_slice(&t, "t").unwrap(), &[1.0, 7.0, 3.0]);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 7.0, 3.0]);
    }

    #[test]
    fn non_contiguous_or_non_f32_tensors_are_refused_with_their_name() {
        let t = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0]).view([2, 2]).transpose(0, 1);
        let err = host_slice(&t, "w").unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("contiguous: false"), "{err}");
        let d = Tensor::from_slice(&[1f64]);
        assert!(host_slice(&d, "d").unwrap_err().to_string().contains("Double"));
    }

    #[test]
    fn a_host_buffer_round_trips_and_grows() {
        let mut b = HostBuffer::new(2, Device::Cpu).unwrap();
        assert!(!b.is_pinned());
        let src = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
        b.download(&src).unwrap();
        assert_eq!(b.slice(6).unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        b.slice_mut(6).unwrap()[0] = -1.0;
        let mut dst = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        b.upload(&mut dst).unwrap();
        assert_eq!(Vec::<f32>::try_from(dst.flatten(0, -1)).unwrap(), vec![-1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
