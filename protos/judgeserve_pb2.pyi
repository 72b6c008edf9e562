from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_AR: _ClassVar[Mode]
    MODE_STANDARD: _ClassVar[Mode]
    MODE_JUDGE: _ClassVar[Mode]

class Provenance(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROVENANCE_UNSPECIFIED: _ClassVar[Provenance]
    PROVENANCE_TARGET: _ClassVar[Provenance]
    PROVENANCE_MATCHED: _ClassVar[Provenance]
    PROVENANCE_JUDGE: _ClassVar[Provenance]
    PROVENANCE_CORRECTION: _ClassVar[Provenance]
    PROVENANCE_BONUS: _ClassVar[Provenance]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
MODE_UNSPECIFIED: Mode
MODE_AR: Mode
MODE_STANDARD: Mode
MODE_JUDGE: Mode
PROVENANCE_UNSPECIFIED: Provenance
PROVENANCE_TARGET: Provenance
PROVENANCE_MATCHED: Provenance
PROVENANCE_JUDGE: Provenance
PROVENANCE_CORRECTION: Provenance
PROVENANCE_BONUS: Provenance
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_ERROR: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "messages", "prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "mode", "judge_threshold", "draft_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    messages: ChatMessages
    prompt_ids: TokenIds
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    mode: Mode
    judge_threshold: float
    draft_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., prompt_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., mode: _Optional[_Union[Mode, str]] = ..., judge_threshold: _Optional[float] = ..., draft_tokens: _Optional[int] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("text", "token_ids", "provenance")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    provenance: _containers.RepeatedScalarFieldContainer[Provenance]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., provenance: _Optional[_Iterable[_Union[Provenance, str]]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("draft_seconds", "verify_seconds", "judge_seconds", "total_seconds", "overhead_seconds", "draft_compute_seconds", "verify_compute_seconds", "judge_compute_seconds", "transport_seconds", "prefill_seconds")
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    draft_seconds: float
    verify_seconds: float
    judge_seconds: float
    total_seconds: float
    overhead_seconds: float
    draft_compute_seconds: float
    verify_compute_seconds: float
    judge_compute_seconds: float
    transport_seconds: float
    prefill_seconds: float
    def __init__(self, draft_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., judge_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., overhead_seconds: _Optional[float] = ..., draft_compute_seconds: _Optional[float] = ..., verify_compute_seconds: _Optional[float] = ..., judge_compute_seconds: _Optional[float] = ..., transport_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("finish_reason", "mode", "prompt_tokens", "completion_tokens", "steps", "speculative_steps", "draft_tokens_accepted", "mean_accepted_per_step", "judge_accepted_tokens", "wall_seconds", "tokens_per_second", "timings", "error")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    JUDGE_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    mode: Mode
    prompt_tokens: int
    completion_tokens: int
    steps: int
    speculative_steps: int
    draft_tokens_accepted: int
    mean_accepted_per_step: float
    judge_accepted_tokens: int
    wall_seconds: float
    tokens_per_second: float
    timings: Timings
    error: str
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., mode: _Optional[_Union[Mode, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., speculative_steps: _Optional[int] = ..., draft_tokens_accepted: _Optional[int] = ..., mean_accepted_per_step: _Optional[float] = ..., judge_accepted_tokens: _Optional[int] = ..., wall_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "delta", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    delta: Delta
    final: Final
    def __init__(self, request_id: _Optional[str] = ..., delta: _Optional[_Union[Delta, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("name", "family", "layers", "hidden_size", "vocab_size", "dtype", "fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    fingerprint: str
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class JudgeDescription(_message.Message):
    __slots__ = ("present", "target_name", "target_fingerprint", "default_threshold")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    present: bool
    target_name: str
    target_fingerprint: str
    default_threshold: float
    def __init__(self, present: _Optional[bool] = ..., target_name: _Optional[str] = ..., target_fingerprint: _Optional[str] = ..., default_threshold: _Optional[float] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("name", "target", "draft", "judge", "default_mode", "default_draft_tokens", "default_max_tokens", "max_seq_len", "lossy_note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    LOSSY_NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: ModelDescription
    draft: ModelDescription
    judge: JudgeDescription
    default_mode: Mode
    default_draft_tokens: int
    default_max_tokens: int
    max_seq_len: int
    lossy_note: str
    def __init__(self, name: _Optional[str] = ..., target: _Optional[_Union[ModelDescription, _Mapping]] = ..., draft: _Optional[_Union[ModelDescription, _Mapping]] = ..., judge: _Optional[_Union[JudgeDescription, _Mapping]] = ..., default_mode: _Optional[_Union[Mode, str]] = ..., default_draft_tokens: _Optional[int] = ..., default_max_tokens: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., lossy_note: _Optional[str] = ...) -> None: ...
