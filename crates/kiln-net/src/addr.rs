//! TODO(issue 10): being written.
