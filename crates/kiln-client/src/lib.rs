//! Client of kiln's HTTP API (filled in by the next commit).
