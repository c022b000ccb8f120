"""Install step: pull, extract into staging, verify against the driver-image contract, rename into place.

`image` runs one install; `tar` and `unpack` turn hostile layers into a staging tree; `verify`
and `modinfo` check it against docs/driver-image.md; `trees` owns the layout under
install.root (`current`, pruning, debris); `fs` holds the filesystem primitives they trust.
"""
