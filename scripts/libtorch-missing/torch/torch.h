// Found only when libtorch is not set up: .cargo/config.toml puts this directory on the C++
// include path *after* libtorch's own, so that building before `scripts/setup` stops with one
// clear sentence instead of a page of missing-header errors.
#error "libtorch not found: run `scripts/setup` once (it installs PyTorch 2.11.0 into .venv), then build again."
#include <stop-here-after-the-message-above>
