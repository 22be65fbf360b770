"""Units, sizes and special tokens shared by the model, the processor and the engine."""

SAMPLE_RATE = 16_000  # Hz: every waveform inside Lyra is 16 kHz mono float32 in [-1, 1]
HOP_LENGTH = 160  # samples between two log-mel frames (10 ms)
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
WINDOW_SECONDS = 30  # Whisper's fixed receptive window
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480_000 samples per window
WINDOW_MEL_FRAMES = WINDOW_SECONDS * MEL_FRAMES_PER_SECOND  # 3000 mel frames per window
ENCODER_FRAMES_PER_WINDOW = WINDOW_MEL_FRAMES // 2  # 1500: Whisper's conv2 has stride 2
SAMPLES_PER_ENCODER_FRAME = WINDOW_SAMPLES // ENCODER_FRAMES_PER_WINDOW  # 320 samples = 20 ms

IMAGE_PLACEHOLDER = "<image>"  # in user text: one image goes here
SPEECH_PLACEHOLDER = "<speech>"  # in user text: one audio clip goes here (any length)

# Qwen2-VL's own special tokens (ids fixed by the Qwen2 vocabulary).
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
VIDEO_PAD_TOKEN = "<|video_pad|>"
# Lyra's speech placeholder: the first id after Qwen2-VL's specials (151657); its embedding row is
# overwritten by projected speech features, so the (untrained) row in a Qwen2-VL checkpoint never matters.
SPEECH_PAD_TOKEN = "<|speech_pad|>"

# mm_token_type_ids values understood by Qwen2-VL's get_rope_index. Speech is typed as text on purpose:
# that gives speech tokens plain 1-D positions repeated on all three M-RoPE axes.
TOKEN_TYPE_TEXT = 0
TOKEN_TYPE_IMAGE = 1
TOKEN_TYPE_VIDEO = 2

IGNORE_INDEX = -100  # label value ignored by the cross-entropy

# Typed instructions shared by the data builder, the training mixtures and the engine.
ASR_PROMPT = "Transcribe the speech."  # after the speech: write down what it says
SAY_PROMPT = "Say this sentence: "  # before a sentence: the read-aloud speech-generation samples

# Attribute on a layer (linear or embedding) that the model's weight initialisation must leave at zero: a part
# added to a trained model then changes nothing until training moves it.
ZERO_INIT = "_lyra_zero_init"
