"""The methods wing: one module or package per method (EC2T in ``ec2t/``), pure functions first, plus the helpers several methods share."""
