//! Wire format between kiln's host and its guest agent (stub).
