//! Tests of the viewer side.
