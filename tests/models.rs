//! Model artifacts: presets, imports keyed by content, and `dagrun generate` on them.

mod common;

use common::{Project, object_path};

const BASE: &str =
    "seed: 3\nstages:\n  base:\n    kind: init_model\n    params: { preset: nano }\n";

#[test]
fn a_preset_model_is_a_hugging_face_directory_and_generates_reproducibly() {
    let p = Project::new("preset");
    p.write("p.yaml", BASE);
    let run = p.run("p.yaml", &[]);
    let dir = object_path(&p.cache(), &run.output("base", "model"));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    assert_eq!(
        header["__metadata__"]["format"], "pt",
        "transformers needs format: pt"
    );
    assert!(header.get("model.embed_tokens.weight").is_some());

    let args = [
        "generate",
        "base.model",
        "--prompt",
        "12+34=",
        "--max-new-tokens",
        "8",
        "--json",
    ];
    let a = p.output(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = p.output(&args);
    assert_eq!(a.stdout, b.stdout, "greedy generation is deterministic");
    let out: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let (ids, logprobs) = (
        out["token_ids"].as_array().unwrap(),
        out["logprobs"].as_array().unwrap(),
    );
    assert!(!ids.is_empty() && ids.len() == logprobs.len());
    assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0));
    // The same seed gives the same weights: a second cache makes the same digest.
    let q = Project::new("preset-again");
    q.write("p.yaml", BASE);
    assert_eq!(
        q.run("p.yaml", &[]).output("base", "model"),
        run.output("base", "model")
    );
}

#[test]
fn a_preset_shape_can_be_changed_field_by_field() {
    let p = Project::new("preset-config");
    p.write("p.yaml", "seed: 3\nstages:\n  base:\n    kind: init_model\n    params: { preset: nano, config: { num_hidden_layers: 1, intermediate_size: 200 } }\n");
    let run = p.run("p.yaml", &[]);
    let dir = object_path(&p.cache(), &run.output("base", "model"));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    assert_eq!(config["intermediate_size"], 200);
    assert_eq!(config["hidden_size"], 128, "the rest is the preset's");
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    assert!(header.get("model.layers.0.mlp.up_proj.weight").is_some());
    assert!(
        header.get("model.layers.1.mlp.up_proj.weight").is_none(),
        "one layer only"
    );
    assert_eq!(
        header["model.layers.0.mlp.up_proj.weight"]["shape"],
        serde_json::json!([200, 128])
    );
}

#[test]
fn an_imported_directory_is_keyed_by_its_content() {
    let p = Project::new("import");
    p.write("p.yaml", BASE);
    let base = p.run("p.yaml", &[]).output("base", "model");
    assert!(
        p.output(&["export", "base.model", "hf/base", "-p", "p.yaml"])
            .status
            .success()
    );
    p.write(
        "i.yaml",
        "stages:\n  imported:\n    kind: init_model\n    params: { from: hf/base }\n",
    );
    let first = p.run("i.yaml", &[]);
    assert_eq!(
        first.output("imported", "model"),
        base,
        "a faithful copy has the same digest"
    );
    assert_eq!(p.run("i.yaml", &[]).status("imported"), "cached");
    // Moving the directory keeps the key; editing a file changes it.
    std::fs::rename(p.dir.join("hf/base"), p.dir.join("hf/moved")).unwrap();
    p.write(
        "i.yaml",
        "stages:\n  imported:\n    kind: init_model\n    params: { from: hf/moved }\n",
    );
    assert_eq!(p.run("i.yaml", &[]).status("imported"), "cached");
    let cfg = p.dir.join("hf/moved/generation_config.json");
    std::fs::write(&cfg, "{\"max_new_tokens\": 7}").unwrap();
    let edited = p.run("i.yaml", &[]);
    assert_eq!(edited.status("imported"), "ran");
    assert_ne!(edited.output("imported", "model"), base);
}

#[test]
fn a_missing_import_directory_is_a_located_error() {
    let p = Project::new("import-missing");
    p.write(
        "i.yaml",
        "stages:\n  imported:\n    kind: init_model\n    params: { from: nowhere }\n",
    );
    let out = p.output(&["run", "i.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("i.yaml:4:21: param `from`:"), "{err}");
}
