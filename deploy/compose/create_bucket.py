"""One-shot bucket creation for docker-compose.yml: make MERGELINE_S3_BUCKET exist, waiting for S3 to come up.

Idempotent: an existing bucket owned by these credentials counts as success. Reads the same MERGELINE_* variables
as the service; uses only boto3, which the API image already has.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ALREADY_THERE = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}


def main(attempts: int = 60, pause_s: float = 2.0) -> int:
    bucket = os.environ.get("MERGELINE_S3_BUCKET", "mergeline")
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("MERGELINE_S3_ENDPOINT_URL") or None,
        region_name=os.environ.get("MERGELINE_S3_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("MERGELINE_S3_ACCESS_KEY_ID"),
        aws_secret_access_key=os.environ.get("MERGELINE_S3_SECRET_ACCESS_KEY"),
        config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30),
    )
    last_error: Exception | None = None
    for _ in range(attempts):
        try:
            s3.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket}")
            return 0
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ALREADY_THERE:
                print(f"bucket {bucket} already exists")
                return 0
            last_error = error
        except BotoCoreError as error:  # S3 not listening yet
            last_error = error
        time.sleep(pause_s)
    print(f"could not create bucket {bucket}: {last_error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
