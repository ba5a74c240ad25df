//! Filling batches allocates nothing once the buffers have grown (the hot loop of training).
//!
//! Alone in its own test binary because it counts allocations process-wide.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use common::write;
use gradflow_data::{Batch, CsvSchema, Epochs, Format, Reader, ReaderConfig, ShardSpec};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made while reading the middle of the second epoch (the first grows the
/// buffers; the start of an epoch opens the file).
fn allocations_mid_epoch(config: &ReaderConfig) -> u64 {
    let mut reader = Reader::open(config, ShardSpec::default()).unwrap();
    let mut batch = Batch::new(0);
    while !reader.end_of_epoch() {
        reader.next_batch(&mut batch, 32).unwrap();
    }
    for _ in 0..3 {
        reader.next_batch(&mut batch, 32).unwrap();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(reader.next_batch(&mut batch, 32).unwrap(), 32);
    }
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn no_allocation_in_the_steady_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("label,a,b,c0,c1\n");
    let mut svm = String::new();
    for i in 0..2000 {
        csv.push_str(&format!("{},{}.5,-{i},\"v{}\",w{}\n", i % 2, i, i % 7, i % 3));
        svm.push_str(&format!("{} {}:1 {}:0.5 {}:2\n", i % 2, i, i + 1, i * 7));
    }
    let mut config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "a.csv", csv)]);
    config.csv = CsvSchema::new("label", vec!["c0".into(), "c1".into()]);
    config.epochs = Epochs::Count(2);
    config.shuffle_buffer = 50;
    config.buffer_bytes = 100;
    assert_eq!(allocations_mid_epoch(&config), 0, "csv");
    let mut config = ReaderConfig::new(Format::Libsvm, vec![write(dir.path(), "a.libsvm", svm)]);
    config.epochs = Epochs::Count(2);
    assert_eq!(allocations_mid_epoch(&config), 0, "libsvm");
}
