//! Reading a state dict saved with `torch.save` (a zip archive holding `data.pkl` and one raw
//! file per storage), without Python. libtorch's C++ reader (tch's `loadz_multi`) refuses the
//! `OrderedDict` that `model.state_dict()` is, so this reads the pickle itself. Only what a
//! saved state dict needs is understood: dicts (nested ones are flattened with dots), tensors
//! (`_rebuild_tensor_v2`, `_rebuild_parameter`), numbers, strings, tuples and lists. No Python
//! object is ever constructed: a class it does not know is an opaque value, never called.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use tch::{Kind, Tensor};

/// A value on the pickle machine's stack.
#[derive(Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`, not resolved.
    Global(String),
    Storage {
        kind: Kind,
        key: String,
    },
    Tensor(Tensor),
    Mark,
    /// A call to something this reader does not construct.
    Opaque(String),
}

impl Clone for Value {
    fn clone(&self) -> Self {
        match self {
            Value::None => Value::None,
            Value::Bool(b) => Value::Bool(*b),
            Value::Int(i) => Value::Int(*i),
            Value::Float(f) => Value::Float(*f),
            Value::Str(s) => Value::Str(s.clone()),
            Value::Tuple(v) => Value::Tuple(v.clone()),
            Value::List(v) => Value::List(v.clone()),
            Value::Dict(v) => Value::Dict(v.clone()),
            Value::Global(g) => Value::Global(g.clone()),
            Value::Storage { kind, key } => Value::Storage {
                kind: *kind,
                key: key.clone(),
            },
            Value::Tensor(t) => Value::Tensor(t.shallow_clone()),
            Value::Mark => Value::Mark,
            Value::Opaque(s) => Value::Opaque(s.clone()),
        }
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// The archive: `PREFIX/data.pkl` and `PREFIX/data/KEY`.
struct Archive<'a> {
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    prefix: String,
    storages: HashMap<String, Tensor>,
}

impl Archive<'_> {
    fn read(&mut self, name: &str) -> Result<Vec<u8>, String> {
        let full = format!("{}{name}", self.prefix);
        let mut entry = self
            .zip
            .by_name(&full)
            .map_err(|e| format!("no '{full}' in the archive: {e}"))?;
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot read '{full}': {e}"))?;
        Ok(out)
    }

    /// One storage as a flat tensor (read once, shared by the tensors that view it).
    fn storage(&mut self, kind: Kind, key: &str) -> Result<Tensor, String> {
        if let Some(t) = self.storages.get(key) {
            return Ok(t.shallow_clone());
        }
        let bytes = self.read(&format!("data/{key}"))?;
        let size = kind.elt_size_in_bytes();
        if bytes.len() % size != 0 {
            return Err(format!(
                "storage '{key}' has {} bytes, not a whole number of {kind:?} values",
                bytes.len()
            ));
        }
        let t = Tensor::f_from_data_size(&bytes, &[(bytes.len() / size) as i64], kind)
            .map_err(|e| format!("storage '{key}': {e}"))?;
        self.storages.insert(key.to_string(), t.shallow_clone());
        Ok(t)
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => Ok(*n),
                other => Err(format!("{what} holds {other:?}, not an integer")),
            })
            .collect(),
        other => Err(format!("{what} is {other:?}, not a tuple of integers")),
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
fn rebuild_tensor(args: &[Value], archive: &mut Archive) -> Result<Value, String> {
    let [
        Value::Storage { kind, key },
        Value::Int(offset),
        size,
        stride,
        ..,
    ] = args
    else {
        return Err(format!("unexpected _rebuild_tensor_v2 arguments: {args:?}"));
    };
    let storage = archive.storage(*kind, key)?;
    let (size, stride) = (ints(size, "size")?, ints(stride, "stride")?);
    let needed = size
        .iter()
        .zip(&stride)
        .map(|(n, s)| (n - 1).max(0) * s)
        .sum::<i64>()
        + offset
        + 1;
    if size.iter().all(|n| *n > 0) && needed > storage.size()[0] {
        return Err(format!(
            "a tensor of size {size:?} and stride {stride:?} at {offset} runs past storage '{key}' ({} values)",
            storage.size()[0]
        ));
    }
    Ok(Value::Tensor(
        storage.as_strided(&size, &stride, *offset).contiguous(),
    ))
}

fn call(f: &Value, args: Value, archive: &mut Archive) -> Result<Value, String> {
    let Value::Global(name) = f else {
        return Ok(Value::Opaque(format!("{f:?}")));
    };
    let args = match args {
        Value::Tuple(a) => a,
        other => vec![other],
    };
    match name.as_str() {
        "collections.OrderedDict" | "builtins.dict" => Ok(Value::Dict(Vec::new())),
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            rebuild_tensor(&args, archive)
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            Ok(args.into_iter().next().unwrap_or(Value::None))
        }
        other => Ok(Value::Opaque(other.to_string())),
    }
}

/// Reads little-endian fields off the pickle.
struct Ops<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Ops<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let out = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or_else(|| format!("data.pkl ends inside an instruction at byte {}", self.at))?;
        self.at += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn line(&mut self) -> Result<String, String> {
        let end = self.bytes[self.at..]
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("data.pkl: a GLOBAL without its newline")?;
        let s = String::from_utf8_lossy(&self.bytes[self.at..self.at + end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

fn pop(stack: &mut Vec<Value>) -> Result<Value, String> {
    stack
        .pop()
        .ok_or_else(|| "data.pkl: stack underflow".into())
}

/// Everything above the last MARK, which is removed.
fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>, String> {
    let at = stack
        .iter()
        .rposition(|v| matches!(v, Value::Mark))
        .ok_or("data.pkl: no MARK")?;
    let items = stack.split_off(at + 1);
    stack.pop();
    Ok(items)
}

fn set_items(target: &mut Value, items: Vec<Value>) -> Result<(), String> {
    let Value::Dict(d) = target else {
        return Err(format!("data.pkl: SETITEMS on {target:?}"));
    };
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
    Ok(())
}

/// Run the pickle machine over `data.pkl`.
fn unpickle(pkl: &[u8], archive: &mut Archive) -> Result<Value, String> {
    let mut ops = Ops { bytes: pkl, at: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    loop {
        let op = ops.u8()?;
        match op {
            0x80 => {
                ops.u8()?;
            }
            0x95 => {
                ops.take(8)?;
            }
            b'.' => return pop(&mut stack),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => {
                let v = ops.u8()?;
                stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = u16::from_le_bytes(ops.take(2)?.try_into().expect("2"));
                stack.push(Value::Int(v as i64));
            }
            b'J' => {
                let v = ops.u32()? as i32;
                stack.push(Value::Int(v as i64));
            }
            0x8a => {
                let n = ops.u8()? as usize;
                let b = ops.take(n)?;
                if n > 8 {
                    return Err("data.pkl: an integer wider than 64 bits".into());
                }
                let negative = b.last().is_some_and(|x| x & 0x80 != 0);
                let mut buf = [if negative { 0xff } else { 0 }; 8];
                buf[..n].copy_from_slice(b);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                let v = f64::from_be_bytes(ops.take(8)?.try_into().expect("8"));
                stack.push(Value::Float(v));
            }
            b'X' => {
                let n = ops.u32()? as usize;
                stack.push(Value::Str(ops.utf8(n)?));
            }
            0x8c | b'U' => {
                let n = ops.u8()? as usize;
                stack.push(Value::Str(ops.utf8(n)?));
            }
            b'T' => {
                let n = ops.u32()? as usize;
                stack.push(Value::Str(ops.utf8(n)?));
            }
            b'c' => {
                let module = ops.line()?;
                let name = ops.line()?;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            0x93 => {
                let (name, module) = (pop(&mut stack)?, pop(&mut stack)?);
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    other => return Err(format!("data.pkl: STACK_GLOBAL of {other:?}")),
                }
            }
            b'q' => {
                let i = ops.u8()? as u32;
                memo.insert(
                    i,
                    stack
                        .last()
                        .ok_or("data.pkl: BINPUT on empty stack")?
                        .clone(),
                );
            }
            b'r' => {
                let i = ops.u32()?;
                memo.insert(
                    i,
                    stack
                        .last()
                        .ok_or("data.pkl: LONG_BINPUT on empty stack")?
                        .clone(),
                );
            }
            0x94 => {
                let i = memo.len() as u32;
                memo.insert(
                    i,
                    stack
                        .last()
                        .ok_or("data.pkl: MEMOIZE on empty stack")?
                        .clone(),
                );
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    ops.u8()? as u32
                } else {
                    ops.u32()?
                };
                stack.push(
                    memo.get(&i)
                        .ok_or(format!("data.pkl: memo {i} unset"))?
                        .clone(),
                );
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("data.pkl: stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Value::Tuple(parts) = &pid else {
                    return Err(format!("data.pkl: persistent id {pid:?}"));
                };
                match parts.as_slice() {
                    [Value::Str(tag), Value::Global(ty), Value::Str(key), ..]
                        if tag == "storage" =>
                    {
                        let short = ty.rsplit('.').next().unwrap_or(ty);
                        let kind = storage_kind(short)
                            .ok_or_else(|| format!("storage type {ty} is not supported"))?;
                        stack.push(Value::Storage {
                            kind,
                            key: key.clone(),
                        });
                    }
                    _ => return Err(format!("data.pkl: persistent id {pid:?}")),
                }
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(call(&f, args, archive)?);
            }
            b's' => {
                let (v, k) = (pop(&mut stack)?, pop(&mut stack)?);
                set_items(
                    stack.last_mut().ok_or("data.pkl: SETITEM on empty stack")?,
                    vec![k, v],
                )?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                set_items(
                    stack
                        .last_mut()
                        .ok_or("data.pkl: SETITEMS on empty stack")?,
                    items,
                )?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.push(v);
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.extend(items);
                }
            }
            // BUILD sets an object's state (an OrderedDict's `_metadata`): not needed.
            b'b' => {
                pop(&mut stack)?;
            }
            other => {
                return Err(format!(
                    "data.pkl: pickle instruction 0x{other:02x} at byte {} is not one a saved state dict uses",
                    ops.at - 1
                ));
            }
        }
    }
}

/// Tensors of a (possibly nested) dict, named by their keys joined with dots.
fn flatten(prefix: &str, v: Value, out: &mut Vec<(String, Tensor)>) {
    match v {
        Value::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s,
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, v, out);
            }
        }
        Value::Tensor(t) => out.push((prefix.to_string(), t)),
        _ => {}
    }
}

/// Every named tensor of a `torch.save` archive, in the file's order.
pub fn read_torch_save(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let zip =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("not a zip archive: {e}"))?;
    let pkl_name = zip
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or("the archive has no data.pkl (not a torch.save file)")?
        .to_string();
    let prefix = pkl_name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_string();
    let mut archive = Archive {
        zip,
        prefix,
        storages: HashMap::new(),
    };
    let pkl = archive.read("data.pkl")?;
    let value = unpickle(&pkl, &mut archive)?;
    let mut out = Vec::new();
    flatten("", value, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A zip archive holding `files` (name, bytes), stored as torch.save stores them.
    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in files {
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    #[test]
    fn a_hand_made_state_dict_reads_its_tensors_with_their_strides() {
        // {"w": _rebuild_tensor_v2(storage 0 (6 floats), offset 1, size (2, 2), stride (1, 2))}
        let mut pkl = vec![0x80, 2, b'}'];
        pkl.extend(b"X\x01\x00\x00\x00w");
        pkl.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        pkl.extend(b"K\x01K\x02K\x02\x86K\x01K\x02\x86\x89N");
        pkl.extend(b"tRs.");
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let bytes = archive(&[("m/data.pkl", &pkl), ("m/data/0", &data)]);
        let tensors = read_torch_save(&bytes).unwrap();
        assert_eq!(tensors.len(), 1);
        assert_eq!(tensors[0].0, "w");
        let w: Vec<f32> = Vec::try_from(tensors[0].1.flatten(0, -1)).unwrap();
        // Element (i, j) is storage[1 + i + 2 j]: [[1, 3], [2, 4]].
        assert_eq!(w, vec![1.0, 3.0, 2.0, 4.0]);
    }

    #[test]
    fn what_is_not_a_state_dict_is_refused_with_the_reason() {
        assert!(
            read_torch_save(b"PK\x03\x04 cut")
                .unwrap_err()
                .contains("not a zip archive")
        );
        let no_pickle = archive(&[("m/version", b"3")]);
        assert!(
            read_torch_save(&no_pickle)
                .unwrap_err()
                .contains("no data.pkl")
        );
        let cut = archive(&[("m/data.pkl", &[0x80, 2, b'X', 5, 0])]);
        assert!(
            read_torch_save(&cut)
                .unwrap_err()
                .contains("ends inside an instruction")
        );
        let unknown = archive(&[("m/data.pkl", &[0x80, 2, b'i'])]);
        let err = read_torch_save(&unknown).unwrap_err();
        assert!(err.contains("0x69"), "{err}");
        // A tensor that would read past its storage.
        let mut pkl = vec![0x80, 2, b'}'];
        pkl.extend(b"X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ");
        pkl.extend(b"K\x00K\x05\x85K\x01\x85\x89NtRs.");
        let short = archive(&[("m/data.pkl", &pkl), ("m/data/0", &[0u8; 8])]);
        let err = read_torch_save(&short).unwrap_err();
        assert!(err.contains("runs past storage '0'"), "{err}");
    }
}
