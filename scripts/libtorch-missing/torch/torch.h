// Found only when libtorch is not set up: .cargo/config.toml puts this directory on the C++
// include path *after* libtorch's own, so that building before `scripts/setup` stops with one
// clear sentence instead of a missing-header error.
#error "libtorch not found: run `scripts/setup` once (it installs PyTorch 2.11.0 into .venv), then build again."
