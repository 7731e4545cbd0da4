//! Prints a GGUF file's metadata (long arrays abbreviated) and tensor directory: `gguf_info MODEL.gguf`.

use quantfleet_engine::gguf::{GgufFile, MetadataValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args_os().nth(1).ok_or("usage: gguf_info MODEL.gguf")?;
    let g = GgufFile::open(path.as_ref())?;
    println!("GGUF v{}, alignment {}, {} tensors", g.version, g.alignment, g.tensors().len());
    for key in g.metadata_keys() {
        match g.metadata(key) {
            Some(MetadataValue::Array(items)) => {
                let head: Vec<String> = items.iter().take(6).map(|v| format!("{v:?}")).collect();
                println!("{key}: array[{}] {}", items.len(), head.join(", "))
            }
            Some(v) => println!("{key}: {v:?}"),
            None => {}
        }
    }
    for t in g.tensors() {
        println!("{:32} {:6} {:?} @{} ({} bytes)", t.name, t.ggml_type.name(), t.dims, t.start, t.len);
    }
    Ok(())
}
