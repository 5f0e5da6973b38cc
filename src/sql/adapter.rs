//! The source's patch stream as DataFusion's `SendableRecordBatchStream`, for engines that take
//! one (failures are collected aside, so the stream itself carries only patch rows).

#![warn(missing_docs)]

use std::sync::{Arc, Mutex};

use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use tokio::sync::mpsc;

use crate::patch::patch_schema;
use crate::source::{Failure, SourceItem};

/// The same patches as a DataFusion stream, for other engines; failures are collected aside.
pub fn into_record_batch_stream(
    rx: mpsc::Receiver<SourceItem>,
    failures: Arc<Mutex<Vec<Failure>>>,
) -> SendableRecordBatchStream {
    let stream = futures::stream::unfold(rx, move |mut rx| {
        let failures = failures.clone();
        async move {
            loop {
                match rx.recv().await? {
                    SourceItem::Batch(b) => return Some((Ok(b.batch), rx)),
                    SourceItem::Failed(f) => failures.lock().unwrap().push(f),
                }
            }
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(patch_schema(), stream))
}
