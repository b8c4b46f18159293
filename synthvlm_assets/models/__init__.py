"""Where model weights come from (a Hugging Face id, a local folder, an s3:// prefix) and the `tiny`
preset: small randomly initialised models of the real architectures, built in code, offline."""
