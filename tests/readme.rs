//! The README's TOML example is a config `vipo train` accepts (every key known, values valid).

#[test]
fn readme_train_config_parses() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```toml\n").expect("a toml block in the README") + "```toml\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let cfg = vipo::train::config::TrainConfig::from_toml(block).unwrap_or_else(|e| panic!("README toml: {e}"));
    assert_eq!(cfg.lora_rank, 16);
}
