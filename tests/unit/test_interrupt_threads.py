"""Interrupting signals reach the main thread: every worker thread the engine starts blocks them."""
import signal
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.interrupt import INTERRUPTS, main_thread_only
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.readahead import ReadAhead


def blocked_here():
    return signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_pool_workers_block_the_interrupts():
    with ThreadPoolExecutor(max_workers=2, initializer=main_thread_only) as pool:
        mask = pool.submit(blocked_here).result()
    assert set(INTERRUPTS) <= set(mask) and signal.SIGINT in mask
    assert signal.SIGINT not in blocked_here()          # the main thread still takes them


def test_readahead_worker_blocks_the_interrupts():
    seen = []

    def read_into(offset, view):
        seen.append(blocked_here())
    items = list(ReadAhead([("a", 0, 16, read_into)], chunk=4096, depth=2))
    assert len(items) == 1 and set(INTERRUPTS) <= set(seen[0])


def test_the_engine_pools_use_it():
    import inspect
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vmdk import extent
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops import compare, convert
    for module in (convert, compare, extent):
        source = inspect.getsource(module)
        assert source.count("ThreadPoolExecutor(") == source.count("initializer=main_thread_only"), module.__name__
