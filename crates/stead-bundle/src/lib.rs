//! App bundles: packing an app folder into tar+zstd, and checking and unpacking untrusted ones safely.
