//! The command line's view of a run: a progress bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use patchgd::pipeline::RunObserver;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} images {elapsed_precise} {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar
        });
        Self { bar }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl RunObserver for Progress {
    fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
    fn epoch_started(&self, label: &str, images: usize) {
        if let Some(b) = &self.bar {
            b.set_prefix(label.to_string());
            b.set_length(images as u64);
            b.set_position(0);
        }
    }
    fn images_done(&self, images: usize) {
        if let Some(b) = &self.bar {
            b.set_position(images as u64);
        }
    }
    fn finished(&self) {
        self.finish();
    }
}
