"""The leaf: errors, typed specs, files, hub resolution, offline assets; imports no other layer."""
