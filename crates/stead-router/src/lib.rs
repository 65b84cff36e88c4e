//! The HTTP reverse proxy in front of every app.
