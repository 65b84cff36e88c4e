//! The data-plane agent: registers its host, runs builds and resolves intended instances into running sandboxes.
