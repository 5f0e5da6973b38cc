//! Starting the backbone from pretrained weights (`model.pretrained`): a PyTorch state dict
//! saved with `torch.save(model.state_dict())` (a zip archive, `.pt`/`.pth`) or a safetensors
//! file, with torchvision's names (`layer1.0.conv1.weight`), DataParallel's (`module.…`) or
//! patchgd's own (`backbone.…`). The trunks carry torchvision's names, so a torchvision file's
//! tensors line up one to one; what the file lacks (the projection to D, the head) starts fresh,
//! and what the model lacks (torchvision's `fc`/`classifier`, `num_batches_tracked`) is unused.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use tch::Tensor;

use super::Model;

/// Pretrained weights that cannot be used, naming the file and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    /// libtorch or safetensors could not read the file.
    #[error("pretrained weights '{url}': cannot read them: {reason}")]
    Unreadable {
        /// The file.
        url: String,
        /// The reader's message.
        reason: String,
    },
    /// Neither a `torch.save` zip archive nor safetensors.
    #[error(
        "pretrained weights '{url}' are neither a PyTorch state dict saved with torch.save (a zip \
         archive, starting 'PK') nor safetensors (an 8-byte header length, then '{{'); the file \
         starts with {start}"
    )]
    UnknownLayout {
        /// The file.
        url: String,
        /// Its first bytes, escaped.
        start: String,
    },
    /// A tensor the backbone has is in the file with another shape.
    #[error(
        "pretrained weights '{url}': tensor '{key}' has shape {found:?}, but the model's '{name}' \
         has shape {expected:?} (another architecture, or another width?)"
    )]
    Shape {
        /// The file.
        url: String,
        /// The tensor's name in the file.
        key: String,
        /// The model variable it would load into.
        name: String,
        /// Its shape in the file.
        found: Vec<i64>,
        /// The model's shape.
        expected: Vec<i64>,
    },
    /// The file shares no name with the backbone.
    #[error(
        "pretrained weights '{url}' hold none of the {backbone} backbone's {wanted} tensors: the \
         file has {count} tensors, such as {examples}; expected torchvision's names, such as \
         '{expected}'"
    )]
    NoBackboneNames {
        /// The file.
        url: String,
        /// The backbone's name.
        backbone: &'static str,
        /// How many tensors the backbone has.
        wanted: usize,
        /// How many the file has.
        count: usize,
        /// A few of the file's names.
        examples: String,
        /// One name the backbone would take.
        expected: String,
    },
}

/// What loading did: model variables loaded and left fresh, file tensors not used.
#[derive(Debug, Default, PartialEq)]
pub struct PretrainedReport {
    /// Model variables that now hold the file's values.
    pub loaded: Vec<String>,
    /// Model variables the file does not have (they keep their fresh initialisation).
    pub fresh: Vec<String>,
    /// File tensors that went nowhere.
    pub unused: Vec<String>,
}

impl PretrainedReport {
    /// The lines a run logs: counts, then names (grouped where they are many).
    pub fn lines(&self, url: &str) -> Vec<String> {
        vec![
            format!(
                "pretrained: loaded {} tensors from {url}",
                self.loaded.len()
            ),
            format!(
                "pretrained: starting fresh ({}): {}",
                self.fresh.len(),
                summarise(&self.fresh)
            ),
            format!(
                "pretrained: not used from the file ({}): {}",
                self.unused.len(),
                summarise(&self.unused)
            ),
        ]
    }
}

/// Names grouped by their layer (`head.*: 14`), so a line stays readable.
fn summarise(names: &[String]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        let group = match n.rsplit_once('.') {
            Some((_, "num_batches_tracked")) => "*.num_batches_tracked".to_string(),
            Some((owner, _)) => format!("{owner}.*"),
            None => n.clone(),
        };
        *groups.entry(group).or_default() += 1;
    }
    groups
        .into_iter()
        .map(|(g, n)| format!("{g} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The file's first bytes, printable.
fn escaped_start(bytes: &[u8]) -> String {
    let head: String = bytes[..bytes.len().min(12)]
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    format!("'{head}' ({} bytes in all)", bytes.len())
}

/// Read every named tensor of a `torch.save` zip archive or a safetensors file.
pub fn read_tensors(bytes: &[u8], url: &str) -> Result<Vec<(String, Tensor)>, PretrainedError> {
    let extension = if bytes.starts_with(b"PK\x03\x04") {
        "pt"
    } else if bytes.len() > 9
        && u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) < bytes.len() as u64
        && bytes[8] == b'{'
    {
        "safetensors"
    } else {
        return Err(PretrainedError::UnknownLayout {
            url: url.into(),
            start: escaped_start(bytes),
        });
    };
    let unreadable = |reason: String| PretrainedError::Unreadable {
        url: url.into(),
        reason,
    };
    if extension == "pt" {
        return super::torch_pickle::read_torch_save(bytes).map_err(unreadable);
    }
    // tch reads safetensors from a path: the bytes go through a temporary file.
    let mut file = tempfile::Builder::new()
        .suffix(&format!(".{extension}"))
        .tempfile()
        .map_err(|e| unreadable(format!("temporary file: {e}")))?;
    file.write_all(bytes)
        .map_err(|e| unreadable(format!("temporary file: {e}")))?;
    Tensor::read_safetensors(file.path()).map_err(|e| unreadable(e.to_string()))
}

/// Load the backbone's variables from `file` (named as torchvision, DataParallel or patchgd
/// name them); everything else keeps its initial values.
pub fn load_backbone(
    model: &Model,
    file: &[(String, Tensor)],
    url: &str,
) -> Result<PretrainedReport, PretrainedError> {
    let by_name: HashMap<&str, &Tensor> = file.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut vars: Vec<(String, Vec<i64>)> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    vars.sort();
    let mut used: Vec<&str> = Vec::new();
    let mut chosen: Vec<(String, Tensor)> = Vec::new();
    let mut report = PretrainedReport::default();
    for (name, shape) in &vars {
        let found = name.strip_prefix("backbone.").and_then(|rest| {
            [rest.to_string(), name.clone(), format!("module.{rest}")]
                .into_iter()
                .find_map(|key| by_name.get(key.as_str()).map(|t| (key, *t)))
        });
        let Some((key, t)) = found else {
            report.fresh.push(name.clone());
            continue;
        };
        if &t.size() != shape {
            return Err(PretrainedError::Shape {
                url: url.into(),
                key,
                name: name.clone(),
                found: t.size(),
                expected: shape.clone(),
            });
        }
        used.push(by_name.get_key_value(key.as_str()).expect("found above").0);
        chosen.push((name.clone(), t.shallow_clone()));
        report.loaded.push(name.clone());
    }
    if chosen.is_empty() {
        let backbone: Vec<&String> = vars
            .iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with("backbone.") && !n.starts_with("backbone.project."))
            .collect();
        return Err(PretrainedError::NoBackboneNames {
            url: url.into(),
            backbone: model.spec.backbone.name(),
            wanted: backbone.len(),
            count: file.len(),
            examples: file
                .iter()
                .take(3)
                .map(|(n, _)| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", "),
            expected: backbone
                .first()
                .and_then(|n| n.strip_prefix("backbone."))
                .unwrap_or_default()
                .to_string(),
        });
    }
    report.unused = file
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !used.contains(&n.as_str()))
        .cloned()
        .collect();
    report.unused.sort();
    model
        .load_some(&chosen)
        .expect("names and shapes were checked above");
    Ok(report)
}

/// What `model.init_from` did.
#[derive(Debug, Default, PartialEq)]
pub struct InitReport {
    /// Variables loaded from the earlier run.
    pub loaded: usize,
    /// Why the head starts fresh, when it does (another class count).
    pub fresh_head: Option<String>,
}

/// Load a previous patchgd run's weights (`model.safetensors` of its output or of one of its
/// checkpoints) into `model`: every variable, except a head whose shapes differ (another class
/// count), which starts fresh. A backbone that differs is an error naming the tensor.
pub fn load_run_weights(
    model: &Model,
    file: &[(String, Tensor)],
    url: &str,
) -> Result<InitReport, PretrainedError> {
    let by_name: HashMap<&str, &Tensor> = file.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let vars = model.named_tensors();
    let is_head = |n: &str| n.starts_with("head.") || n.starts_with("classifier.");
    let mut head_mismatch = None;
    for (name, var) in &vars {
        let found = by_name.get(name.as_str());
        let fits = found.is_some_and(|t| t.size() == var.size());
        if fits {
            continue;
        }
        if is_head(name) {
            head_mismatch.get_or_insert_with(|| match found {
                Some(t) => format!(
                    "'{name}' has shape {:?} in the earlier run and {:?} here (another class count?)",
                    t.size(),
                    var.size()
                ),
                None => format!("the earlier run has no '{name}'"),
            });
            continue;
        }
        return Err(match found {
            Some(t) => PretrainedError::Shape {
                url: url.into(),
                key: name.clone(),
                name: name.clone(),
                found: t.size(),
                expected: var.size(),
            },
            None => PretrainedError::Unreadable {
                url: url.into(),
                reason: format!(
                    "the earlier run has no '{name}': it trained another backbone or method"
                ),
            },
        });
    }
    let chosen: Vec<(String, Tensor)> = vars
        .iter()
        .filter(|(n, _)| head_mismatch.is_none() || !is_head(n))
        .map(|(n, _)| (n.clone(), by_name[n.as_str()].shallow_clone()))
        .collect();
    model
        .load_some(&chosen)
        .expect("names and shapes were checked above");
    Ok(InitReport {
        loaded: chosen.len(),
        fresh_head: head_mismatch,
    })
}
