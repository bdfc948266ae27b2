"""sftpfs: a fast FUSE file system for hosts that speak SFTP and nothing else."""

__version__ = "0.1.0"
