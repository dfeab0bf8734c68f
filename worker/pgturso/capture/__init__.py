"""Capture on the Postgres side: the capture functions' and copies' SQL, the type map, table layouts."""
