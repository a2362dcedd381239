//! Test API server (not written yet).
