//! [`ReadAhead`]: a [`Reader`] on a thread of its own, a few batches ahead of the one being
//! trained, so that parsing leaves the training loop's critical path.
//!
//! The batches come in the reader's order, each prepared (standardized, say) on the reading
//! thread; a batch given back with [`ReadAhead::recycle`] is refilled, so a steady loop
//! allocates nothing. An error ends the stream and is returned in place of the batch it
//! would have been, as [`Reader::next_batch`] would have returned it.

use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};
use std::thread::JoinHandle;

use crate::error::{DataError, Result};
use crate::{Batch, Reader};

/// One batch read ahead.
#[derive(Debug)]
pub struct Ahead {
    pub batch: Batch,
    /// The reader's [`Reader::epoch`] after reading it.
    pub epoch: u64,
    /// Whether it is the last batch of its epoch ([`Reader::end_of_epoch`]).
    pub end_of_epoch: bool,
}

/// See the module docs.
pub struct ReadAhead {
    full: Receiver<Result<Ahead>>,
    empty: Sender<Batch>,
    thread: Option<JoinHandle<()>>,
}

impl ReadAhead {
    /// Reads `reader` in batches of `batch_size` on a new thread, at most `depth` (at least 1)
    /// batches ahead, calling `prepare` on each batch there.
    pub fn spawn(
        mut reader: Reader,
        batch_size: usize,
        depth: usize,
        mut prepare: impl FnMut(&mut Batch) + Send + 'static,
    ) -> Result<ReadAhead> {
        let (full_tx, full): (SyncSender<Result<Ahead>>, _) = sync_channel(depth.max(1));
        let (empty, empty_rx) = channel::<Batch>();
        let thread = std::thread::Builder::new()
            .name("gradflow-read-ahead".into())
            .spawn(move || {
                loop {
                    let mut batch = match empty_rx.try_recv() {
                        Ok(batch) => batch,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                            Batch::new(reader.num_dense())
                        }
                    };
                    let ahead = match reader.next_batch(&mut batch, batch_size) {
                        Ok(0) => return,
                        Ok(_) => {
                            prepare(&mut batch);
                            Ok(Ahead { batch, epoch: reader.epoch(), end_of_epoch: reader.end_of_epoch() })
                        }
                        Err(e) => Err(e),
                    };
                    let failed = ahead.is_err();
                    if full_tx.send(ahead).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| DataError::Config(format!("cannot start the read-ahead thread: {e}")))?;
        Ok(ReadAhead { full, empty, thread: Some(thread) })
    }

    /// The next batch, or `None` once the reader is done (or after an error was returned).
    ///
    /// # Panics
    /// With the reading thread's panic, if it panicked (in `prepare`, say), as reading on this
    /// thread would have: never as a quiet end of the data.
    pub fn next(&mut self) -> Result<Option<Ahead>> {
        match self.full.recv() {
            Ok(ahead) => ahead.map(Some),
            Err(_) => {
                if let Some(Err(panic)) = self.thread.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                Ok(None)
            }
        }
    }

    /// Gives a batch back to be refilled.
    pub fn recycle(&mut self, batch: Batch) {
        // The thread may have finished; the batch is then simply dropped.
        let _ = self.empty.send(batch);
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Unblocks a thread waiting to hand over a batch; it then sees the channel closed.
        let (_, closed) = sync_channel(1);
        drop(std::mem::replace(&mut self.full, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::{Format, ReaderConfig, ShardSpec};

    /// Two readers of one file holding `text`: one to read directly, one to read ahead.
    fn readers(text: &str, epochs: u64) -> (tempfile::TempDir, Reader, Reader) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.csv");
        std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
        let mut config = ReaderConfig::new(Format::Csv, vec![path]);
        config.epochs = crate::Epochs::Count(epochs);
        let open = || Reader::open(&config, ShardSpec::new(0, 1).unwrap()).unwrap();
        (dir, open(), open())
    }

    fn csv(rows: usize) -> String {
        let mut text = String::from("label,x\n");
        for i in 0..rows {
            text.push_str(&format!("{},{i}\n", i % 2));
        }
        text
    }

    #[test]
    fn batches_read_ahead_are_the_reader_s_own_in_order_with_their_epochs() {
        let text = csv(23);
        let (_dir, mut direct, ahead) = readers(&text, 3);
        let mut ahead =
            ReadAhead::spawn(ahead, 5, 2, |b| b.dense.iter_mut().for_each(|x| *x *= 2.0)).unwrap();
        let mut batch = Batch::new(1);
        let mut count = 0;
        while direct.next_batch(&mut batch, 5).unwrap() > 0 {
            batch.dense.iter_mut().for_each(|x| *x *= 2.0);
            let got = ahead.next().unwrap().expect("as many batches as the reader");
            assert_eq!(got.batch, batch, "batch {count}");
            assert_eq!(
                (got.epoch, got.end_of_epoch),
                (direct.epoch(), direct.end_of_epoch()),
                "batch {count}"
            );
            ahead.recycle(got.batch);
            count += 1;
        }
        assert_eq!(count, 15, "3 epochs of 23 rows in batches of 5");
        assert!(ahead.next().unwrap().is_none());
        assert!(ahead.next().unwrap().is_none());
    }

    #[test]
    fn an_error_comes_in_place_of_its_batch_and_ends_the_stream() {
        let mut text = csv(9);
        text.push_str("1,oops\n");
        text.push_str(&csv(5)[8..]);
        let (_dir, mut direct, ahead) = readers(&text, 1);
        let mut ahead = ReadAhead::spawn(ahead, 2, 4, |_| {}).unwrap();
        let mut batch = Batch::new(1);
        let error = loop {
            match direct.next_batch(&mut batch, 2) {
                Ok(n) => {
                    assert!(n > 0, "the reader reaches the bad line");
                    assert_eq!(ahead.next().unwrap().unwrap().batch, batch);
                }
                Err(e) => break e.to_string(),
            }
        };
        assert!(error.contains("oops"), "{error}");
        assert_eq!(ahead.next().unwrap_err().to_string(), error);
        assert!(ahead.next().unwrap().is_none());
    }

    #[test]
    #[should_panic(expected = "prepare failed on batch 3")]
    fn a_panic_on_the_reading_thread_is_raised_by_next_not_taken_for_the_end() {
        let (_dir, _, reader) = readers(&csv(100), 1);
        let mut seen = 0;
        let mut ahead = ReadAhead::spawn(reader, 10, 1, move |_| {
            seen += 1;
            assert!(seen < 3, "prepare failed on batch {seen}");
        })
        .unwrap();
        while ahead.next().unwrap().is_some() {}
    }

    #[test]
    fn dropping_it_early_stops_the_thread() {
        let (_dir, _, reader) = readers(&csv(1000), 1);
        let mut ahead = ReadAhead::spawn(reader, 1, 1, |_| {}).unwrap();
        assert!(ahead.next().unwrap().is_some());
        drop(ahead); // joins the thread, which is blocked handing over a batch: must not hang
    }
}
