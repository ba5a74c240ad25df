//! A training step of the wide & deep model allocates nothing of its own once its scratch
//! buffers have grown to the batch (issue 19: no allocation per step); only the matrix
//! kernels' packing buffers remain. Its own test binary, because it counts every allocation of
//! the process through the global allocator.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{Rng, random_batch, random_params};
use gradflow_models::{Grads, Kernel, Model, WideDeep, WideDeepConfig};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn wide_deep_steps_allocate_only_inside_the_matrix_kernels() {
    let mut rng = Rng::new(3);
    let config = WideDeepConfig { hash_buckets: 5000, ..WideDeepConfig::new(26, 13) };
    let batches: Vec<_> = (0..3).map(|_| random_batch(&mut rng, 256, 26, 13, 2, 5000)).collect();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for kernel in Kernel::ALL {
            let model = WideDeep::new(config.clone()).unwrap().with_kernel(kernel);
            let params: Vec<_> = batches.iter().map(|b| random_params(&model, b, &mut rng, 0.5)).collect();
            let mut grads = Grads::default();
            pool.install(|| {
                // Warm-up: the scratch buffers and gradients grow to the largest batch.
                for _ in 0..2 {
                    for (b, p) in batches.iter().zip(&params) {
                        model.forward_backward(b, p, &mut grads).unwrap();
                    }
                }
                ALLOCATIONS.store(0, Ordering::SeqCst);
                COUNTING.store(true, Ordering::SeqCst);
                for (b, p) in batches.iter().zip(&params) {
                    model.forward_backward(b, p, &mut grads).unwrap();
                }
                COUNTING.store(false, Ordering::SeqCst);
            });
            let n = ALLOCATIONS.load(Ordering::SeqCst);
            eprintln!("{kernel:?} on {threads} thread(s): {n} allocations in 3 steps");
            // Both kernels allocate a packing buffer inside every product (measured: one each,
            // for both), which the model cannot reuse; everything of the model's own is reused.
            // 9 products per chunk per step (3 layers: forward, weight gradient, input
            // gradient), one chunk per thread at this batch size, 3 steps.
            let bound = 3 * threads * 9;
            assert!(
                n <= bound,
                "{kernel:?} on {threads} thread(s): {n} allocations in 3 steps, more than {bound}"
            );
        }
    }
}
