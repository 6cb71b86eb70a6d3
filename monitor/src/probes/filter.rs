//! `watch --pid/--comm/--port` in the kernel: the programs drop an event that cannot match
//! before it takes ring-buffer space, so a neighbour's flood never crowds out the events
//! being watched. Userspace still applies the exact filter; the kernel's only removes sure
//! mismatches (a socket whose owner it never saw passes the process filters).
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError},
};
use monitor_common::{TASK_COMM_LEN, filter};

/// The filters as the kernel maps hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFilter {
    pids: Vec<u32>,
    comms: Vec<[u8; TASK_COMM_LEN]>,
    ports: Vec<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error(
        "{count} values given to --{flag}, more than {max}: the kernel filter holds {max}; \
         watch fewer, or leave --{flag} out and filter the NDJSON (`--json | jq`)",
        max = filter::MAX_VALUES
    )]
    TooMany { flag: &'static str, count: usize },
    #[error(
        "--comm `{0}` can never match: the kernel keeps a task name's first {max} bytes; \
         give at most those",
        max = TASK_COMM_LEN - 1
    )]
    CommTooLong(String),
    #[error("--comm is empty: give a process name as `ps -o comm` shows it")]
    CommEmpty,
}

#[derive(Debug, thiserror::Error)]
#[error("filling the kernel filter map {map}")]
pub struct LoadError {
    map: &'static str,
    #[source]
    source: MapError,
}

impl KernelFilter {
    pub fn new(pids: &[u32], comms: &[String], ports: &[u16]) -> Result<KernelFilter, FilterError> {
        for (flag, count) in [
            ("pid", pids.len()),
            ("comm", comms.len()),
            ("port", ports.len()),
        ] {
            if count > filter::MAX_VALUES as usize {
                return Err(FilterError::TooMany { flag, count });
            }
        }
        let comms = comms
            .iter()
            .map(|comm| {
                let bytes = comm.as_bytes();
                if bytes.is_empty() {
                    return Err(FilterError::CommEmpty);
                }
                if bytes.len() >= TASK_COMM_LEN {
                    return Err(FilterError::CommTooLong(comm.clone()));
                }
                let mut key = [0; TASK_COMM_LEN];
                key[..bytes.len()].copy_from_slice(bytes);
                Ok(key)
            })
            .collect::<Result<_, _>>()?;
        Ok(KernelFilter {
            pids: pids.to_vec(),
            comms,
            ports: ports.to_vec(),
        })
    }

    /// [`filter`] bits: the filters given.
    pub fn bits(&self) -> u64 {
        [
            (filter::PID, self.pids.is_empty()),
            (filter::COMM, self.comms.is_empty()),
            (filter::PORT, self.ports.is_empty()),
        ]
        .into_iter()
        .filter(|&(_, empty)| !empty)
        .fold(0, |bits, (bit, _)| bits | bit)
    }

    /// Writes the values into the loaded object's maps, before any program is attached.
    pub fn load_into(&self, ebpf: &mut Ebpf) -> Result<(), LoadError> {
        fill(ebpf, "FILTER_PIDS", &self.pids)?;
        fill(ebpf, "FILTER_COMMS", &self.comms)?;
        fill(ebpf, "FILTER_PORTS", &self.ports)
    }
}

/// The flags as given, e.g. `--port 5432 --comm psql`: what lost events passed.
impl std::fmt::Display for KernelFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut flags = Vec::new();
        flags.extend(self.pids.iter().map(|pid| format!("--pid {pid}")));
        flags.extend(self.comms.iter().map(|comm| {
            let name = comm.split(|&b| b == 0).next().unwrap_or_default();
            format!("--comm {}", String::from_utf8_lossy(name))
        }));
        flags.extend(self.ports.iter().map(|port| format!("--port {port}")));
        f.write_str(&flags.join(" "))
    }
}

fn fill<K: aya::Pod>(ebpf: &mut Ebpf, map: &'static str, keys: &[K]) -> Result<(), LoadError> {
    if keys.is_empty() {
        return Ok(());
    }
    let error = |source| LoadError { map, source };
    let found = ebpf.map_mut(map).ok_or(error(MapError::InvalidName {
        name: map.to_string(),
    }))?;
    let mut values: BpfHashMap<&mut MapData, K, u8> = BpfHashMap::try_from(found).map_err(error)?;
    for key in keys {
        values.insert(key, 1, 0).map_err(error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_name_the_filters_given() {
        assert_eq!(KernelFilter::default().bits(), 0);
        let ports = KernelFilter::new(&[], &[], &[5432]).unwrap();
        assert_eq!(ports.bits(), filter::PORT);
        let all = KernelFilter::new(&[1], &["psql".into()], &[5432]).unwrap();
        assert_eq!(all.bits(), filter::PID | filter::COMM | filter::PORT);
        assert_eq!(all.to_string(), "--pid 1 --comm psql --port 5432");
    }

    #[test]
    fn comm_keys_are_zero_padded_like_the_kernels() {
        let filter = KernelFilter::new(&[], &["psql".into()], &[]).unwrap();
        assert_eq!(&filter.comms[0][..5], b"psql\0");
        assert!(filter.comms[0].iter().skip(4).all(|&b| b == 0));
        let longest = "a".repeat(TASK_COMM_LEN - 1);
        assert!(KernelFilter::new(&[], &[longest], &[]).is_ok());
    }

    #[test]
    fn impossible_values_are_refused_with_the_fix() {
        let long = "a".repeat(TASK_COMM_LEN);
        let err = KernelFilter::new(&[], &[long], &[]).unwrap_err();
        assert!(err.to_string().contains("first 15 bytes"), "{err}");
        assert_eq!(
            KernelFilter::new(&[], &[String::new()], &[]),
            Err(FilterError::CommEmpty)
        );
        let pids: Vec<u32> = (1..=65).collect();
        let err = KernelFilter::new(&pids, &[], &[]).unwrap_err();
        assert!(err.to_string().contains("more than 64"), "{err}");
    }
}
