"""The identities and data every moto-backed test starts from, created
through boto3 while moto's authentication is still off:

- IAM user ``laptop-user`` with long-term keys, allowed to call STS only
  (``AssumeRole``, ``GetSessionToken``, ``GetCallerIdentity``): the "laptop";
- role ``cluster-reader``, which that user may assume, allowed to list and
  read bucket ``seed-data``;
- bucket ``seed-data`` with object ``reports/hello.txt``.

One script for both suites: ``python/tests/conftest.py`` imports
:func:`seed`; the Rust tests (``tests/src/moto.rs``) run this file with
``python -c`` and the server's URL as its argument, and read the JSON it
prints.
"""

from __future__ import annotations

import json
import sys

BUCKET = "seed-data"
KEY = "reports/hello.txt"
BODY = b"hello from moto s3"

MINT_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["sts:AssumeRole", "sts:GetSessionToken", "sts:GetCallerIdentity"],
            "Resource": "*",
        }
    ],
}

READ_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
        }
    ],
}


def seed(url: str) -> dict[str, str]:
    """Creates the user, role, bucket and object on the moto server at
    ``url``; returns the user's keys and ARN and the role's ARN."""
    # Here, not at the top: conftest imports this module in every test
    # session, and only the sessions that start moto need boto3.
    import boto3

    kw: dict[str, str] = {
        "endpoint_url": url,
        "region_name": "us-east-1",
        "aws_access_key_id": "seed",
        "aws_secret_access_key": "seed",
    }
    iam = boto3.client("iam", **kw)
    s3 = boto3.client("s3", **kw)
    user = iam.create_user(UserName="laptop-user")["User"]
    iam.put_user_policy(
        UserName="laptop-user", PolicyName="mint", PolicyDocument=json.dumps(MINT_POLICY)
    )
    key = iam.create_access_key(UserName="laptop-user")["AccessKey"]
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": user["Arn"]}, "Action": "sts:AssumeRole"}
        ],
    }
    role = iam.create_role(RoleName="cluster-reader", AssumeRolePolicyDocument=json.dumps(trust))[
        "Role"
    ]
    iam.put_role_policy(
        RoleName="cluster-reader", PolicyName="read", PolicyDocument=json.dumps(READ_POLICY)
    )
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=BODY)
    return {
        "access_key_id": str(key["AccessKeyId"]),
        "secret_access_key": str(key["SecretAccessKey"]),
        "user_arn": str(user["Arn"]),
        "role_arn": str(role["Arn"]),
    }


if __name__ == "__main__":
    print(json.dumps(seed(sys.argv[1])))
