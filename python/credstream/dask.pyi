import os
from typing import Any, Dict, Mapping, Optional, Union

from distributed.diagnostics.plugin import WorkerPlugin

class AgentNotReadyError(RuntimeError): ...

def agent_binary() -> str: ...
def parse_env_file(text: str) -> Dict[str, str]: ...
def send_private_envs(target: Any, env: Mapping[str, str]) -> None: ...

class CredstreamPlugin(WorkerPlugin):
    name: str
    broker: str
    cluster: str
    ready_timeout: float
    seal_key_id: Optional[str]
    def __init__(
        self,
        broker: str,
        cluster: str,
        agent_token: str,
        *,
        ready_timeout: float = ...,
        gce_metadata: bool = ...,
        ca_cert: Optional[str] = ...,
        tls_client_cert: Optional[str] = ...,
        tls_client_key: Optional[str] = ...,
        insecure: bool = ...,
        name: Optional[str] = ...,
        seal: bool = ...,
        seal_key_file: Optional[Union[str, os.PathLike[str]]] = ...,
    ) -> None: ...
    @property
    def sealed(self) -> bool: ...
    def attach(self) -> None: ...
    def detach(self) -> None: ...
    async def setup(self, worker: Any) -> None: ...
    async def teardown(self, worker: Any) -> None: ...
