//! Single-precision matrix products over row-major slices, through one of two kernels: the
//! `matrixmultiply` crate (through `ndarray`'s `general_mat_mul`, what the models used first)
//! or the `gemm` crate, whose packing and micro-kernels suit the MLP's small shapes better
//! (measured by `gradflow bench --only compute`; docs/performance.md, issue 19).
//!
//! Every product runs on the calling thread: the models split a batch over rayon themselves,
//! one chunk per thread, which suits a 256-row batch better than splitting one product.
//!
//! This is the one module of the crate with `unsafe` code: `gemm` takes raw pointers and
//! strides. [`Mat::new`] checks that a slice holds its matrix, [`matmul`] that the shapes agree
//! and that the output holds the product; the output is a `&mut` slice, so it cannot overlap
//! the inputs.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};
use serde::{Deserialize, Serialize};

/// Which code computes the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// The `matrixmultiply` crate, through `ndarray`.
    Matrixmultiply,
    /// The `gemm` crate (sarah-quinones'), with no threading of its own.
    Gemm,
}

impl Kernel {
    /// Both kernels, the models' default last.
    pub const ALL: [Kernel; 2] = [Kernel::Matrixmultiply, Kernel::Gemm];

    /// The kernel the models use unless told otherwise: the faster of the two in the wide &
    /// deep MLP's shapes on the machines measured (docs/performance.md, issue 19).
    pub const DEFAULT: Kernel = Kernel::Gemm;

    /// The crate's name.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Matrixmultiply => "matrixmultiply",
            Kernel::Gemm => "gemm",
        }
    }
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel::DEFAULT
    }
}

/// A row-major `rows x cols` matrix held in the start of a slice, used as it is or transposed.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Mat<'a> {
    /// The first `rows * cols` floats of `data`, row after row.
    ///
    /// # Panics
    /// When `data` is shorter than that.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        let len = rows.checked_mul(cols).expect("matrix size overflows");
        assert!(
            data.len() >= len,
            "a {rows} x {cols} matrix needs {len} floats, the slice has {}",
            data.len()
        );
        Mat { data: &data[..len], rows, cols, transposed: false }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Mat { transposed: !self.transposed, ..self }
    }

    /// Rows and columns as used (after any transpose).
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed { (self.cols, self.rows) } else { (self.rows, self.cols) }
    }

    /// Strides (row, column) in floats, as used.
    fn strides(&self) -> (usize, usize) {
        if self.transposed { (1, self.cols) } else { (self.cols, 1) }
    }

    fn view(&self) -> ArrayView2<'a, f32> {
        let stored = ArrayView2::from_shape((self.rows, self.cols), self.data).expect("checked in Mat::new");
        if self.transposed { stored.reversed_axes() } else { stored }
    }
}

/// `c = a · b`, or `c += a · b` when `accumulate`; `c` is row-major `m x n` (its first
/// `m * n` floats) where `a` is `m x k` and `b` is `k x n` as used.
///
/// # Panics
/// When the inner dimensions differ or `c` is shorter than `m * n`.
pub fn matmul(kernel: Kernel, a: Mat<'_>, b: Mat<'_>, c: &mut [f32], accumulate: bool) {
    let (m, k) = a.shape();
    let (kb, n) = b.shape();
    assert_eq!(k, kb, "inner dimensions differ: {m} x {k} times {kb} x {n}");
    assert!(c.len() >= m * n, "a {m} x {n} product needs {} floats, the output has {}", m * n, c.len());
    let c = &mut c[..m * n];
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    match kernel {
        Kernel::Matrixmultiply => {
            let mut cv = ArrayViewMut2::from_shape((m, n).strides((n, 1)), c).expect("sized above");
            general_mat_mul(1.0, &a.view(), &b.view(), if accumulate { 1.0 } else { 0.0 }, &mut cv);
        }
        Kernel::Gemm => {
            let (ars, acs) = a.strides();
            let (brs, bcs) = b.strides();
            // SAFETY: `a` reads at most `(m-1)*ars + (k-1)*acs` past its start, which is below
            // `rows * cols` of its slice (Mat::new checked the length; the strides are those of
            // the stored matrix, in either orientation); the same holds for `b`. `c` holds
            // `m * n` floats at strides (n, 1) and, being `&mut`, overlaps neither input. All
            // sizes are below `isize::MAX` because they index live slices.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    accumulate,
                    a.data.as_ptr(),
                    acs as isize,
                    ars as isize,
                    b.data.as_ptr(),
                    bcs as isize,
                    brs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop, in f64.
    fn reference(a: Mat<'_>, b: Mat<'_>) -> Vec<f64> {
        let (m, k) = a.shape();
        let n = b.shape().1;
        let at = |i: usize, j: usize, x: &Mat<'_>| {
            let (rs, cs) = x.strides();
            x.data[i * rs + j * cs] as f64
        };
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| at(i, p, &a) * at(p, j, &b)).sum();
            }
        }
        out
    }

    fn fill(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn both_kernels_match_the_reference_in_every_orientation() {
        // The wide & deep shapes (a chunk of 128 of the 221-64-32-1 MLP) and odd ones.
        for (m, k, n) in [(128, 221, 64), (221, 128, 64), (128, 64, 208), (128, 32, 1), (7, 5, 3), (1, 9, 1)]
        {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let (ad, bd) = (fill(ar * ac, 1), fill(br * bc, 2));
                let a = if ta { Mat::new(&ad, ar, ac).t() } else { Mat::new(&ad, ar, ac) };
                let b = if tb { Mat::new(&bd, br, bc).t() } else { Mat::new(&bd, br, bc) };
                let want = reference(a, b);
                for kernel in Kernel::ALL {
                    let start = fill(m * n, 3);
                    for accumulate in [false, true] {
                        let mut c = start.clone();
                        matmul(kernel, a, b, &mut c, accumulate);
                        for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                            let w = if accumulate { w + start[i] as f64 } else { w };
                            assert!(
                                (got as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f64).sqrt(),
                                "{kernel:?} {m}x{k}x{n} ta={ta} tb={tb} acc={accumulate} [{i}]: {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_inner_dimension_clears_or_keeps() {
        for kernel in Kernel::ALL {
            let mut c = vec![5.0; 6];
            matmul(kernel, Mat::new(&[], 2, 0), Mat::new(&[], 0, 3), &mut c, true);
            assert_eq!(c, [5.0; 6]);
            matmul(kernel, Mat::new(&[], 2, 0), Mat::new(&[], 0, 3), &mut c, false);
            assert_eq!(c, [0.0; 6]);
        }
    }

    #[test]
    #[should_panic(expected = "inner dimensions differ")]
    fn mismatched_shapes_panic() {
        let x = [0.0f32; 12];
        matmul(Kernel::Gemm, Mat::new(&x, 3, 4), Mat::new(&x, 3, 4), &mut [0.0; 16], false);
    }

    #[test]
    #[should_panic(expected = "needs 12 floats")]
    fn short_slices_panic() {
        Mat::new(&[0.0; 11], 3, 4);
    }
}
