"""Where images come from and how they are decoded: the archive's Parquet shards (`archive`: partitions, the one
row filter), ingest of folders and manifests into it (`ingest`), image bytes to arrays (`images`), the night's
decode tasks (`decoding`) and the scoring actors' own JPEG decode (`device_decode`), and the project's generated
products with exact defect masks (`synthetic`)."""
